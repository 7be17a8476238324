"""Student helpers (docs/method.md §4): which parameters train, the feature loss, and export (open_clip's
layout, or spar's for backbones that are not open_clip models)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from spar.interface import Backbone

DEFAULT_TRAINABLE = "blk_-1,blk_-2"


def trainable_parameter_names(backbone: Backbone, spec: str = DEFAULT_TRAINABLE) -> list[str]:
    """Names (relative to ``backbone.clip``) of the parameters that `spec` trains.

    `spec` is a comma-separated list of: ``blk_i`` (all parameters of block i), ``qkv_i`` (its
    query/key/value projection), ``mlp_i`` (its MLP), ``posembed``, ``patchembed``, or ``all``
    (the whole image tower). Block indices may be negative (``blk_-1`` is the last block).
    """
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise ValueError("empty trainable spec")
    if "all" in items:
        return [f"visual.{n}" for n, _ in backbone.vision.named_parameters()]
    groups = backbone.param_groups()
    depth = len(backbone.blocks)
    names: list[str] = []
    for item in items:
        kind, _, index = item.partition("_")
        if kind in ("blk", "qkv", "mlp"):
            try:
                i = int(index)
            except ValueError:
                raise ValueError(f"bad trainable item {item!r}: expected {kind}_<int>") from None
            if not -depth <= i < depth:
                raise ValueError(f"trainable item {item!r}: block index out of range for {depth} blocks")
            key = f"{kind}_{i % depth}"
        elif item in ("posembed", "patchembed"):
            key = item
        else:
            raise ValueError(f"unknown trainable item {item!r}; use blk_i, qkv_i, mlp_i, posembed, patchembed or all")
        if key not in groups:  # e.g. posembed of a RoPE backbone
            raise ValueError(f"trainable item {item!r}: backbone {backbone.name} has no such parameters")
        names.extend(n for n in groups[key] if n not in names)
    return names


def set_trainable(backbone: Backbone, spec: str = DEFAULT_TRAINABLE) -> list[str]:
    """Freeze everything, then unfreeze the parameters named by `spec`; returns their names."""
    names = trainable_parameter_names(backbone, spec)
    backbone.requires_grad_(False)
    for n in names:
        backbone.clip.get_parameter(n).requires_grad_(True)
    return names


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run `module` in eval mode inside the block, then restore its train / eval state: scoring a
    student mid-training must not apply train-time augmentation (dinov3txt's ``rope_rescale``)."""
    was = module.training
    module.train(False)
    try:
        yield module
    finally:
        module.train(was)


def feature_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Feature-regression loss between ``(..., h, w, D)`` maps, in float32.

    ``mse`` (the paper), ``smooth_l1``, or ``cosine`` (1 - per-token cosine similarity).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    pred, target = pred.float(), target.float()
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target)
    if kind == "cosine":
        return (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
    raise ValueError(f"unknown loss {kind!r}; use mse, smooth_l1 or cosine")


def export_open_clip(backbone: Backbone, path: str | os.PathLike) -> Path:
    """Write the backbone's full state dict (`Backbone.open_clip_state_dict`) as safetensors.

    ``spar.load_backbone(backbone.name, pretrained=path)`` loads it back bit-exactly. For open_clip
    backbones it is a plain open_clip state dict (``open_clip.create_model(backbone.model_name,
    pretrained=path)`` loads it); for ``dinov3txt`` and ``timm:`` it is spar's layout
    ``spar-timm/1`` (``visual.*``: the timm trunk's state dict plus ``visual.rope.periods``;
    ``text.*``: the dino.txt text tower, if the model had one), see `spar.timm_backbones`.
    """
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"export path must end in .safetensors (open_clip picks the loader by suffix): {path}")
    # clone: safetensors refuses tensors that share storage (tied or viewed weights)
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in backbone.open_clip_state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    layout = getattr(backbone, "export_layout", "open_clip")
    data = save(state, metadata={"format": "pt", "layout": layout, "spar_backbone": backbone.name,
                                 ("open_clip_model" if layout == "open_clip" else "timm_model"): backbone.model_name})
    with open(tmp, "wb") as f:  # plain open: the file gets the user's umask (save_file makes it 0600)
        f.write(data)
    os.replace(tmp, path)
    return path
