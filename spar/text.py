"""The text side of open-vocabulary segmentation (docs/method.md §5): class names -> one embedding per synonym.

A class list is a sequence of lines; each line is one class and may hold several comma-separated
synonyms (``"person, man, woman"``). Every synonym is embedded with the 80 ImageNet prompt
templates of CLIP; each prompt embedding is L2-normalised, the 80 are averaged, and the average
is normalised again. Pixels are later scored against every synonym and a class keeps its best
synonym (`spar.segment.postprocess`).

Embeddings are computed once per (model, class list, templates) and kept in memory for as long
as the model lives, so evaluating many images (or several modes that share a model) pays for
the text tower once.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import nn

from spar.interface import Backbone

log = logging.getLogger(__name__)

# The 80 prompt templates of CLIP's ImageNet zero-shot evaluation, as format strings.
IMAGENET_TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)

_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, TextClassifier]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class TextClassifier:
    """Embeddings of every synonym of every class, and which class each synonym belongs to."""

    embeddings: torch.Tensor  # (S, D) float32, unit rows, on the model's device
    synonym_to_class: torch.Tensor  # (S,) int64 class index of each synonym (non-decreasing)
    class_names: tuple[str, ...]  # first synonym of each class (for tables and legends)
    synonyms: tuple[str, ...]  # all S synonyms, in order

    @property
    def num_classes(self) -> int:
        """Number of classes C (synonyms map into 0..C-1)."""
        return len(self.class_names)


def parse_class_lines(lines: Iterable[str] | str) -> list[list[str]]:
    """Class lines -> synonyms per class. Blank lines and lines starting with ``#`` are skipped;
    synonyms are comma-separated and stripped. A string is split into lines first."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    classes = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        names = [s.strip() for s in line.split(",")]
        if not all(names):
            raise ValueError(f"class line {n} {line!r} has an empty synonym (stray comma?)")
        classes.append(names)
    if not classes:
        raise ValueError("the class list is empty")
    return classes


def get_tokenizer(model_name: str) -> Callable[[Sequence[str]], torch.Tensor]:
    """open_clip's tokenizer of `model_name`; prompts longer than its context are truncated there.

    SigLIP2's tokenizer lives on the Hugging Face hub and needs ``transformers``: offline or
    without the package this fails with a message saying so instead of a bare import error.
    """
    try:
        return open_clip.get_tokenizer(model_name)
    except Exception as e:  # ImportError without transformers, OSError offline, HTTP errors...
        hf_name = (open_clip.get_model_config(model_name) or {}).get("text_cfg", {}).get("hf_tokenizer_name")
        where = f" (Hugging Face tokenizer {hf_name!r})" if hf_name else ""
        raise RuntimeError(
            f"cannot build the text tokenizer of {model_name}{where}: {type(e).__name__}: {e}. "
            "Hugging Face tokenizers need `pip install transformers` and either network access to the hub "
            "or the tokenizer files already in the HF cache (set HF_HUB_OFFLINE=1 to use only the cache)."
        ) from e


@torch.no_grad()
def _embed_prompts(clip: nn.Module, tokenizer, prompts: list[str], batch_size: int, device) -> torch.Tensor:
    out = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start:start + batch_size]).to(device)
        out.append(F.normalize(clip.encode_text(tokens).float(), dim=-1))
    return torch.cat(out)


def build_classifier(
    backbone: Backbone,
    class_lines: Iterable[str] | Sequence[Sequence[str]] | str,
    templates: Sequence[str] = IMAGENET_TEMPLATES,
    batch_size: int = 1024,
) -> TextClassifier:
    """Text embeddings of a class list (docs/method.md §5), cached per model and class list.

    Args:
        backbone: a backbone that still has its text tower (``clip.encode_text``; for ``dinov3txt`` the
            patch-aligned half ``[:, 1024:]`` of dino.txt's 2048-d embedding, as the reference).
        class_lines: class lines (``"cat, kitty"``), one string holding them, or lists of synonyms.
        templates: prompt templates with one ``{}``; the default is CLIP's 80 ImageNet templates.
        batch_size: prompts per text-tower forward.
    """
    items = list(class_lines) if not isinstance(class_lines, str) else class_lines
    if isinstance(items, str) or all(isinstance(x, str) for x in items):
        classes = parse_class_lines(items)
    else:
        classes = [[str(s).strip() for s in syns] for syns in items]
        if not classes or not all(classes) or not all(all(s) for s in classes):
            raise ValueError("every class needs at least one non-empty name")
    clip = backbone.clip
    if not hasattr(clip, "encode_text"):
        raise ValueError(f"backbone {backbone.name} has no text tower (was drop_text_tower() called?)")
    device = next(backbone.parameters()).device
    key = (tuple(tuple(c) for c in classes), tuple(templates), str(device))
    cached = _CACHE.setdefault(clip, {})
    if key in cached:
        return cached[key]
    synonyms = [s for c in classes for s in c]
    prompts = [t.format(s) for s in synonyms for t in templates]
    log.info("embedding %d classes (%d synonyms x %d templates) with %s", len(classes), len(synonyms),
             len(templates), backbone.model_name)
    # backbones whose text side is not an open_clip model bring their own tokenizer (dino.txt: CLIP's BPE)
    tokenizer = clip.tokenize if hasattr(clip, "tokenize") else get_tokenizer(backbone.model_name)
    emb = _embed_prompts(clip, tokenizer, prompts, batch_size, device)
    emb = F.normalize(emb.view(len(synonyms), len(templates), -1).mean(1), dim=-1)
    owner = torch.tensor([i for i, c in enumerate(classes) for _ in c], dtype=torch.long, device=device)
    result = TextClassifier(emb, owner, tuple(c[0] for c in classes), tuple(synonyms))
    cached[key] = result
    return result


def clear_cache() -> None:
    """Forget every cached classifier (e.g. after changing a text tower's weights in place)."""
    _CACHE.clear()
