"""Backbones that are not open_clip models: DINOv3.txt (``dinov3txt``) and any timm ViT (``timm:<name>``).

Both keep the `Backbone` interface; ``backbone.clip`` is a `TimmTowers` container that stands where
open_clip's model stands elsewhere: ``clip.visual`` is the timm trunk, ``clip.text`` an optional
text tower (dino.txt's, `spar.dinotxt`), ``clip.encode_text`` / ``clip.tokenize`` its text side.

**DINOv3.txt** (docs/method.md §1): the image tower is timm's ``vit_large_patch16_dinov3_qkvb``
(patch 16, 1024 wide, 24 blocks of 16 heads, LayerScale, class token + 4 registers, 2-D RoPE on the
patch tokens, no absolute position embedding). The dense map is its patch tokens after the final
LayerNorm, every prefix token dropped: ``(B, H/16, W/16, 1024)``. RoPE stays in float32 whatever the
model's dtype, with the ``periods`` the official checkpoint stores (timm would recompute them).

**timm:<name>**: any timm ViT built with ``dynamic_img_size=True`` (position embeddings resized as
the model itself resizes them); the dense map is ``forward_features`` with the prefix tokens
dropped. Window, mean and std come from the model's ``pretrained_cfg``. No text side: cache and
train only.

Weights (``pretrained=``), a comma-separated list of local / ``file://`` / ``s3://`` files, each
recognised by its keys, all read without unpickling (`spar.weights.read_state_dict`):

* the official DINOv3 backbone (``dinov3_vitl16_pretrain_lvd1689m-*.pth``: ``storage_tokens``,
  ``blocks.N.ls1.gamma``, ``blocks.N.attn.qkv.bias`` + ``bias_mask``, ``rope_embed.periods``, ...),
  mapped by timm's ``checkpoint_filter_fn``;
* the official dino.txt file (``dinov3_vitl16_dinotxt_vision_head_and_text_encoder-*.pth``:
  ``text_model.*``; its vision head is not used by dense features);
* spar's own export, `EXPORT_LAYOUT` (``student.safetensors``): ``visual.*`` (the timm trunk's state
  dict, plus ``visual.rope.periods``) and, when the model had one, ``text.*`` (the text tower);
* for ``timm:`` backbones, a timm state dict (as timm saves it), or the original release format the
  model's timm module converts (its ``checkpoint_filter_fn``); ``pretrained=timm`` downloads timm's own.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
from typing import Callable, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from spar import dinotxt
from spar.interface import Backbone, BackboneSpec
from spar.weights import OFFLINE_HELP, TIMM_DEFAULT, USER_SUPPLIED, public_url, read_state_dict, resolve_files

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"
EXPORT_LAYOUT = "spar-timm/1"  # safetensors metadata "layout" of `open_clip_state_dict` for these backbones
DINOV3_FILES_HELP = (
    "dinov3txt's weights are gated by the DINOv3 licence and never downloaded: pass the files you have, "
    "pretrained=<dinov3_vitl16_pretrain_lvd1689m-*.pth>,<dinov3_vitl16_dinotxt_vision_head_and_text_encoder-*.pth> "
    "(local paths, file:// or s3:// URLs; the second is only needed for text: evaluation and segmentation), "
    "or pretrained=null for random weights."
)


class TimmTowers(nn.Module):
    """The image tower (``visual``, a timm model) and an optional dino.txt text tower (``text``)."""

    def __init__(self, visual: nn.Module, text: dinotxt.DinoTxtTextTower | None = None):
        super().__init__()
        self.visual = visual
        self.text = text

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Dense classifier embeddings of token ids: the patch-aligned half of dino.txt's output."""
        if self.text is None:
            raise ValueError("this backbone was loaded without a text tower: " + DINOV3_FILES_HELP)
        return self.text.encode_dense(tokens)

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids ``(N, context)`` of the text tower's tokenizer (OpenAI CLIP's BPE)."""
        cfg = self.text.cfg if self.text is not None else dinotxt.TEXT_CONFIGS["dinotxt-l"]
        return dinotxt.tokenizer(cfg)(texts)


def _create_trunk(model_name: str, pretrained: bool = False) -> nn.Module:
    import timm

    kwargs = dict(pretrained=pretrained, num_classes=0, dynamic_img_size=True)
    try:
        return timm.create_model(model_name, **kwargs)
    except TypeError as e:  # models without dynamic_img_size
        raise ValueError(f"timm model {model_name!r} cannot be built with dynamic_img_size=True ({e}); "
                         "only ViT-style timm models with a patch embedding work as dense backbones") from None


class TimmBackbone(Backbone):
    """A timm ViT trunk: ``forward_features`` at any size (``dynamic_img_size``), prefix tokens dropped."""

    patch_fit = "crop"
    export_layout = EXPORT_LAYOUT

    def __init__(self, spec: BackboneSpec, clip: TimmTowers, pretrained: str | None):
        super().__init__(spec, clip, pretrained)
        trunk = clip.visual
        if not hasattr(trunk, "patch_embed") or not hasattr(trunk, "blocks"):
            raise TypeError(f"{spec.model_name}: a dense backbone needs a timm ViT (patch_embed + blocks)")
        ph, pw = trunk.patch_embed.patch_size
        if ph != pw:
            raise TypeError(f"{spec.model_name}: non-square patches {ph}x{pw} are not supported")
        self.patch_size = ph
        self.dim = trunk.num_features

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.clip.visual.blocks

    def param_groups(self) -> dict[str, list[str]]:
        trunk = self.clip.visual
        groups = {"patchembed": [f"visual.patch_embed.{n}" for n, _ in trunk.patch_embed.named_parameters()]}
        if getattr(trunk, "pos_embed", None) is not None:
            groups["posembed"] = ["visual.pos_embed"]
        for i, blk in enumerate(self.blocks):
            base = f"visual.blocks.{i}"
            groups[f"blk_{i}"] = [f"{base}.{n}" for n, _ in blk.named_parameters()]
            groups[f"qkv_{i}"] = [f"{base}.attn.{n}" for n, _ in blk.attn.named_parameters()
                                  if n.split(".")[0] in ("qkv", "q_proj", "k_proj", "v_proj", "q_bias", "k_bias",
                                                         "v_bias")]
            groups[f"mlp_{i}"] = [f"{base}.mlp.{n}" for n, _ in blk.mlp.named_parameters()]
        return groups

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.clip.visual.set_grad_checkpointing(enable)

    def _dense_tokens(self, x: torch.Tensor) -> torch.Tensor:
        trunk = self.clip.visual
        tokens = trunk.forward_features(x.to(trunk.patch_embed.proj.weight.dtype))
        return tokens[:, trunk.num_prefix_tokens:]

    def open_clip_state_dict(self) -> dict[str, torch.Tensor]:
        """Not an open_clip layout for these backbones: `EXPORT_LAYOUT` (``visual.*``, ``text.*``),
        which ``spar.load_backbone(name, pretrained=path)`` loads back."""
        return self.clip.state_dict()


class DINOv3Backbone(TimmBackbone):
    """DINOv3 ViT (timm Eva with DINOv3 RoPE); images are stretched to patch multiples for segmentation.

    ``rope_rescale``: None (the default, as the reference trains) or R >= 1. With R, in train mode,
    every block's RoPE coordinates are scaled by its own log-uniform draw in [1/R, R], as the
    official DINOv3 code does in train mode (``pos_embed_rope_rescale_coords=2`` for ViT-L). The
    SPAR reference trains with pytorch_lightning 2.5.3, whose ``fit`` no longer calls ``.train()``
    on a module left in eval mode (the reference's), so its RoPE is not rescaled.
    """

    patch_fit = "stretch"

    def __init__(self, spec: BackboneSpec, clip: TimmTowers, pretrained: str | None):
        super().__init__(spec, clip, pretrained)
        rope = getattr(clip.visual, "rope", None)
        if rope is None or not hasattr(rope, "periods") or getattr(clip.visual, "pos_embed", None) is not None:
            raise TypeError(f"{spec.model_name}: the dinov3 head needs a timm Eva with DINOv3 RoPE and no absolute "
                            "position embedding")
        self.rope_rescale: float | None = None
        if rope.periods.is_meta:  # shapes only: no values to keep
            self._rope_periods = torch.zeros(rope.periods.shape, dtype=torch.float32)
        else:
            self._rope_periods = rope.periods.detach().to("cpu", torch.float32).clone()

    def set_rope_periods(self, periods: torch.Tensor) -> None:
        """Use these RoPE periods (the official checkpoint's ``rope_embed.periods``), kept in float32."""
        rope = self.clip.visual.rope
        if periods.shape != rope.periods.shape:
            raise ValueError(f"rope periods of shape {tuple(periods.shape)}, the model has {tuple(rope.periods.shape)}")
        self._rope_periods = periods.detach().to("cpu", torch.float32).clone()
        self._restore_periods()

    def _restore_periods(self) -> None:
        rope = self.clip.visual.rope
        if rope.periods.dtype != torch.float32:  # timm keeps them >= float32; never below
            rope.register_buffer("periods", torch.empty_like(rope.periods, dtype=torch.float32), persistent=False)
        with torch.no_grad():
            rope.periods.copy_(self._rope_periods)

    def _apply(self, fn, *args, **kwargs):
        # timm recomputes the periods when a dtype cast reaches them; put the checkpoint's back
        out = super()._apply(fn, *args, **kwargs)
        if "_rope_periods" in self.__dict__:
            self._restore_periods()
        return out

    def set_rope_rescale(self, factor: float | None) -> None:
        """Train-mode RoPE coordinate rescaling by a log-uniform factor in [1/factor, factor] per block
        (None: off)."""
        if factor is not None and not (math.isfinite(factor) and factor >= 1):
            raise ValueError(f"rope_rescale must be >= 1 (or null), got {factor}")
        rope = self.clip.visual.rope
        if not hasattr(rope, "aug_active"):
            raise TypeError("this timm version's DINOv3 RoPE has no coordinate augmentation")
        self.rope_rescale = factor
        rope.rescale_coords = None if factor is None else float(factor)
        rope.aug_active = bool(rope.shift_coords or rope.jitter_coords or rope.rescale_coords)

    def param_groups(self) -> dict[str, list[str]]:
        groups = super().param_groups()
        groups.pop("posembed", None)  # RoPE: no position parameters
        return groups

    def _dense_tokens(self, x: torch.Tensor) -> torch.Tensor:
        trunk = self.clip.visual
        x = trunk.patch_embed(x.to(trunk.patch_embed.proj.weight.dtype))  # (B, h, w, C): dynamic size
        b, h, w, c = x.shape
        prefix = [t.expand(b, -1, -1) for t in (trunk.cls_token, trunk.reg_token) if t is not None]
        x = trunk.norm_pre(torch.cat([*prefix, x.reshape(b, h * w, c)], dim=1))
        rope = trunk.rope
        per_block = rope.training and getattr(rope, "aug_active", False)  # a fresh draw for every block
        shared = None if per_block else rope.get_embed(shape=(h, w))  # float32 whatever the model's dtype
        for blk in trunk.blocks:
            r = rope.get_embed(shape=(h, w)) if per_block else shared
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, r, use_reentrant=False)
            else:
                x = blk(x, rope=r)
        return trunk.norm(x)[:, trunk.num_prefix_tokens:]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        Backbone.set_grad_checkpointing(self, enable)  # our own block loop checkpoints

    def open_clip_state_dict(self) -> dict[str, torch.Tensor]:
        """`EXPORT_LAYOUT`: the trunk (``visual.*``, with ``visual.rope.periods``) and text tower (``text.*``)."""
        state = dict(self.clip.state_dict())
        state["visual.rope.periods"] = self._rope_periods.clone()
        return state


# -- weights -------------------------------------------------------------------------------------

def _is_official_dinov3(state: dict) -> bool:
    return "storage_tokens" in state and any(k.endswith(".ls1.gamma") for k in state)


def _is_export(state: dict) -> bool:
    return bool(state) and all(k.startswith(("visual.", "text.")) for k in state)


def _describe(path: str, state: dict, n: int = 8) -> str:
    keys = sorted(state)
    more = f", ... ({len(keys)} keys)" if len(keys) > n else ""
    return f"{public_url(path)} (keys: {', '.join(keys[:n])}{more})"


def _masked_qkv_bias(state: dict, path: str) -> dict:
    """`state` with each ``qkv.bias`` replaced by what the official attention adds, ``bias * bias_mask``
    (the mask is 1 on q and v and 0 on k when trained; the distilled releases store zero biases and
    masks). timm keeps q and v biases and fixes k at 0, so a non-zero effective k bias is refused."""
    out = dict(state)
    for k, mask in state.items():
        bias_key = k[: -len("_mask")]
        if not k.endswith(".bias_mask") or bias_key not in state:
            continue
        if not torch.isfinite(mask).all():
            raise ValueError(f"{public_url(path)}: {k} holds non-finite values (an uninitialised mask)")
        bias = state[bias_key].float() * mask.float()
        if torch.any(bias.chunk(3)[1] != 0):
            raise ValueError(f"{public_url(path)}: {bias_key} * {k} has a non-zero k part; timm's DINOv3 fixes it at 0")
        out[bias_key] = bias.to(state[bias_key].dtype)
    return out


def _dinov3_visual(state: dict, trunk: nn.Module, path: str) -> tuple[dict, torch.Tensor | None]:
    """(timm trunk weights, stored RoPE periods) of an official DINOv3 backbone state dict."""
    from timm.models.eva import checkpoint_filter_fn

    state = _masked_qkv_bias(state, path)
    periods = state.get("rope_embed.periods")
    return checkpoint_filter_fn(state, trunk), (periods.float() if periods is not None else None)


def _timm_visual(state: dict, trunk: nn.Module) -> dict:
    """A timm trunk's weights from a timm state dict or an original release its timm module converts."""
    own = set(trunk.state_dict())
    # the trunk is built headless (num_classes=0): a classifier saved with the model is not part of it
    state = {k: v for k, v in state.items() if k in own or not k.startswith(("head.", "head_dist."))}
    if set(state) <= own:
        return state
    convert = getattr(sys.modules.get(type(trunk).__module__), "checkpoint_filter_fn", None)
    return convert(state, trunk) if convert is not None else state


def _load_strict(module: nn.Module, state: dict, what: str, source: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source} does not fit the {what}: missing keys {sorted(missing)[:12]}"
                         f"{' ...' if len(missing) > 12 else ''}, unexpected keys {sorted(unexpected)[:12]}"
                         f"{' ...' if len(unexpected) > 12 else ''}")


def _gather(spec: BackboneSpec, paths: list[str], trunk_template: nn.Module) -> dict:
    """Sort the given files into {"visual": (state, periods, path), "text": (state, path)}."""
    parts: dict = {}

    def put(kind: str, value: tuple, path: str) -> None:
        if kind in parts:
            raise ValueError(f"two files give the {'image' if kind == 'visual' else 'text'} tower: "
                             f"{public_url(parts[kind][-1])} and {public_url(path)}")
        parts[kind] = value

    for path in paths:
        state = read_state_dict(path)
        if _is_export(state):
            visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
            text = {k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}
            if visual:
                put("visual", (visual, visual.pop("rope.periods", None), path), path)
            if text:
                put("text", (text, path), path)
        elif spec.family == "dinov3txt" and _is_official_dinov3(state):
            visual, periods = _dinov3_visual(state, trunk_template, path)
            put("visual", (visual, periods, path), path)
        elif spec.family == "dinov3txt" and dinotxt.is_dinotxt_file(state):
            text, unexpected = dinotxt.text_state_from_dinotxt(state)
            if unexpected:
                raise ValueError(f"{public_url(path)} looks like a dino.txt file but also holds {sorted(unexpected)[:8]}")
            put("text", (text, path), path)
        elif spec.family == "timm":
            put("visual", (_timm_visual(state, trunk_template), None, path), path)
        else:
            raise ValueError(
                f"{_describe(path, state)} is not a {spec.name} weights file. Expected: the official DINOv3 "
                "backbone (storage_tokens, blocks.N.ls1.gamma, blocks.N.attn.qkv.bias, rope_embed.periods, ...), "
                "the official dino.txt file (text_model.*), or a spar export (visual.*, text.*)")
    return parts


def _timm_hub_trunk(model_name: str) -> nn.Module:
    """timm's own pretrained weights (``pretrained=timm``), failing fast when they cannot be fetched."""
    import os

    from spar.weights import _hub_reachable

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if not offline and not _hub_reachable():
        raise RuntimeError(f"Cannot fetch timm weights of {model_name}: the Hugging Face hub is unreachable. "
                           + OFFLINE_HELP)
    try:
        return _create_trunk(model_name, pretrained=True)
    except Exception as e:  # offline and not cached, gated, HTTP errors
        raise RuntimeError(f"Cannot fetch timm weights of {model_name} ({type(e).__name__}: {e}). "
                           + OFFLINE_HELP) from None


def build(spec: BackboneSpec, pretrained: str | None, *, on_meta: bool, init_seed: int,
          storage_options: dict | None) -> Backbone:
    """Build a ``dinov3txt`` / ``timm`` family backbone with its weights (see the module docstring)."""
    if pretrained == USER_SUPPLIED:
        raise FileNotFoundError(DINOV3_FILES_HELP)
    hub = pretrained == TIMM_DEFAULT
    if hub and spec.family != "timm":
        raise ValueError(f"pretrained={TIMM_DEFAULT} is for timm: backbones; {spec.name}: " + DINOV3_FILES_HELP)
    paths = [] if hub else resolve_files(pretrained, storage_options)
    if on_meta and (paths or hub):
        raise ValueError("device='meta' builds shapes only; use pretrained=None")
    with torch.random.fork_rng(devices=[]), (torch.device("meta") if on_meta else contextlib.nullcontext()):
        torch.manual_seed(init_seed)
        trunk = _timm_hub_trunk(spec.model_name) if hub else _create_trunk(spec.model_name)
        parts = _gather(spec, paths, trunk)
        want_text = spec.text_tower is not None and (not paths or "text" in parts)
        text = dinotxt.DinoTxtTextTower(dinotxt.TEXT_CONFIGS[spec.text_tower]) if want_text else None
    if paths and "visual" not in parts:
        raise ValueError(f"pretrained={public_url(pretrained)!r} holds no image tower for {spec.name}. "
                         + (DINOV3_FILES_HELP if spec.family == "dinov3txt" else ""))
    periods = None
    if "visual" in parts:
        state, periods, path = parts["visual"]
        _load_strict(trunk, state, f"{spec.name} image tower ({spec.model_name})", public_url(path))
    if "text" in parts:
        state, path = parts["text"]
        _load_strict(text, state, f"{spec.name} text tower", public_url(path))
    cls = DINOv3Backbone if spec.family == "dinov3txt" else TimmBackbone
    backbone = cls(spec, TimmTowers(trunk, text), pretrained)
    if periods is not None:
        backbone.set_rope_periods(periods)
    return backbone


# -- registry --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def timm_spec(name: str) -> BackboneSpec:
    """The spec of ``timm:<model name>``: window, mean and std from timm's ``pretrained_cfg``,
    patch and width from the model (built on the meta device: no memory, no weights)."""
    import timm

    model_name = name[len(TIMM_PREFIX):]
    if not model_name or not timm.is_model(model_name):
        raise ValueError(f"unknown timm model {model_name!r} in backbone {name!r} (timm.list_models() names them)")
    try:
        with torch.device("meta"):
            trunk = _create_trunk(model_name)
    except ValueError:
        raise
    except Exception:  # a model whose init needs real tensors
        trunk = _create_trunk(model_name)
    cfg = trunk.pretrained_cfg
    _, h, w = cfg.get("input_size", (3, 224, 224))
    if h != w:
        raise ValueError(f"{name}: pre-training input {h}x{w} is not square; sliding windows are square")
    downloadable = bool(cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file"))
    return BackboneSpec(name, model_name, "timm", TIMM_DEFAULT if downloadable else None, int(h),
                        int(trunk.patch_embed.patch_size[0]), int(trunk.num_features),
                        tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
                        tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))), text_tower=None)


BUILDERS: dict[str, Callable[..., Backbone]] = {"dinov3txt": build, "timm": build}
