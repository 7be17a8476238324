"""Backbones by name: ViTs with a dense head at any resolution.

Every backbone is a `Backbone`: an ``nn.Module`` whose ``forward`` is the single-pass dense map
``(B, 3, H, W) -> (B, H/p, W/p, D)`` of docs/method.md §1. The registry maps a short name to a builder:

* ``maskclip``       open_clip ViT-B-16, laion2b_s34b_b88k, window 224, D 512
* ``siglip2``        open_clip ViT-B-16-SigLIP2-512 (timm trunk), webli, window 512, D 768
* ``dinov3txt``      DINOv3 ViT-L/16 (timm trunk) + the dino.txt text tower, user-supplied weights,
                     window 384, D 1024 (`spar.timm_backbones`)
* ``timm:<name>``    any timm ViT, final-norm patch tokens, its pre-training size as window; no text
* ``*-test``         tiny random-initialised members of the same families (CI, smoke runs)
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from spar import _timm_test_models, timm_backbones
from spar.interface import Backbone, BackboneSpec
from spar.weights import resolve_pretrained

log = logging.getLogger(__name__)

open_clip.add_model_config(Path(__file__).parent / "model_configs")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT = "default"  # `pretrained=DEFAULT` means the registry's default weights for that backbone


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry (names are unique)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    """Registered names accepted by `load_backbone` (besides ``timm:<any timm ViT>``)."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The registry entry for `name` (``timm:<model>`` is built from timm's config), or a ValueError
    listing the known names."""
    if str(name).startswith(timm_backbones.TIMM_PREFIX):
        return timm_backbones.timm_spec(str(name))
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {list_backbones()} or timm:<timm model name>") from None


register_backbone(BackboneSpec("maskclip", "ViT-B-16", "maskclip", "laion2b_s34b_b88k", 224, 16, 512, CLIP_MEAN, CLIP_STD))
register_backbone(BackboneSpec("siglip2", "ViT-B-16-SigLIP2-512", "siglip2", "webli", 512, 16, 768, (0.5,) * 3, (0.5,) * 3))
register_backbone(BackboneSpec("maskclip-test", "spar-test-maskclip", "maskclip", None, 64, 16, 32, CLIP_MEAN, CLIP_STD))
register_backbone(BackboneSpec("siglip2-test", "spar-test-sl2", "siglip2", None, 64, 16, 64, (0.5,) * 3, (0.5,) * 3))
# DINOv3 weights are gated (DINOv3 licence): "default" names nothing to download, the user gives the files
register_backbone(BackboneSpec("dinov3txt", "vit_large_patch16_dinov3_qkvb", "dinov3txt", "default", 384, 16, 1024,
                               IMAGENET_MEAN, IMAGENET_STD, text_tower="dinotxt-l"))
register_backbone(BackboneSpec("dinov3txt-test", _timm_test_models.DINOV3_NAME, "dinov3txt", None, 64, 16, 32,
                               IMAGENET_MEAN, IMAGENET_STD, text_tower="dinotxt-test"))


class MaskCLIPBackbone(Backbone):
    """open_clip ``VisionTransformer`` with the value-only last block (MaskCLIP)."""

    def __init__(self, spec: BackboneSpec, clip: nn.Module, pretrained: str | None):
        super().__init__(spec, clip, pretrained)
        visual = clip.visual
        if not isinstance(visual, open_clip.transformer.VisionTransformer):
            raise TypeError(f"{spec.model_name}: maskclip head needs an open_clip VisionTransformer")
        if visual.attn_pool is not None or visual.final_ln_after_pool:
            raise TypeError(f"{spec.model_name}: attentional pooling towers are not supported by the maskclip head")
        for blk in visual.transformer.resblocks:
            if not isinstance(blk.attn, nn.MultiheadAttention):
                raise TypeError(f"{spec.model_name}: maskclip head needs nn.MultiheadAttention blocks")
            _check_attention(blk.attn, spec.model_name)
        self.patch_size = visual.patch_size[0]
        self.dim = visual.output_dim
        n = visual.positional_embedding.shape[0] - 1
        self._pretrain_grid = int(round(n ** 0.5))

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.clip.visual.transformer.resblocks

    def param_groups(self) -> dict[str, list[str]]:
        groups = {"posembed": ["visual.positional_embedding"], "patchembed": ["visual.conv1.weight"]}
        for i, blk in enumerate(self.blocks):
            base = f"visual.transformer.resblocks.{i}"
            groups[f"blk_{i}"] = [f"{base}.{n}" for n, _ in blk.named_parameters()]
            groups[f"qkv_{i}"] = [f"{base}.attn.in_proj_weight", f"{base}.attn.in_proj_bias"]
            groups[f"mlp_{i}"] = [f"{base}.mlp.{n}" for n, _ in blk.mlp.named_parameters()]
        return groups

    def positional_embedding(self, gh: int, gw: int) -> torch.Tensor:
        """Positional embeddings for a gh x gw token grid: bicubic with the DINO +0.1 scale factor."""
        pos = self.clip.visual.positional_embedding
        n = self._pretrain_grid
        if (gh, gw) == (n, n):
            return pos
        cls_pos, patch_pos = pos[:1], pos[1:]
        grid = patch_pos.float().reshape(1, n, n, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((gh + 0.1) / n, (gw + 0.1) / n), mode="bicubic",
                             align_corners=False)
        assert grid.shape[-2:] == (gh, gw), (grid.shape, gh, gw)
        patch_pos = grid.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(pos.dtype)
        return torch.cat([cls_pos, patch_pos], dim=0)

    def _dense_tokens(self, x: torch.Tensor) -> torch.Tensor:
        visual = self.clip.visual
        x = visual.conv1(x.to(visual.conv1.weight.dtype))
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding(gh, gw).to(x.dtype)
        x = visual.ln_pre(x)  # (B, L, width), batch first whatever the tower's own layout
        x = self._run_blocks(visual.transformer.resblocks[:-1], x, _attention_block)
        x = _value_only_block(visual.transformer.resblocks[-1], x)
        x = visual.ln_post(x) @ visual.proj
        return x[:, 1:]


def _check_attention(attn: nn.MultiheadAttention, model_name: str) -> None:
    """`_self_attention` computes plain packed-projection self-attention; refuse anything else."""
    if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn or attn.dropout:
        raise TypeError(f"{model_name}: attention with separate q/k/v projections, bias_k/v, zero attention or "
                        "attention dropout is not supported by the maskclip head")


def _self_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """``nn.MultiheadAttention(x, x, x)`` on batch-first ``(B, L, width)`` tokens, through SDPA.

    The same computation as the module, but every projection is one GEMM on contiguous rows: the
    module transposes batch-first inputs to sequence-first and its projections of the strided view
    turn, under CPU bf16 autocast, into a batched matmul that copies its weight per image (three
    quarters of the teacher's time). SDPA picks flash / memory-efficient kernels where it has them.
    """
    b, n, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(b, n, 3, heads, width // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, L, head_dim) each
    out = F.scaled_dot_product_attention(q, k, v)
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, width))


def _attention_block(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An open_clip ``ResidualAttentionBlock`` on batch-first tokens (self-attention, no mask)."""
    x = x + blk.ls_1(_self_attention(blk.attn, blk.ln_1(x)))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def _value_only_block(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x + out_proj(V(ln_1(x)))`` then the MLP residual: the block with attention replaced by its value path."""
    attn = blk.attn
    width = attn.embed_dim
    bias = attn.in_proj_bias[2 * width:] if attn.in_proj_bias is not None else None
    v = F.linear(blk.ln_1(x), attn.in_proj_weight[2 * width:], bias)
    x = x + blk.ls_1(attn.out_proj(v))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


class SigLIP2Backbone(Backbone):
    """open_clip ``TimmModel`` (timm ViT, MAP head) whose attention pool is reduced to its value path."""

    patch_fit = "pad"  # timm's dynamic_img_pad

    def __init__(self, spec: BackboneSpec, clip: nn.Module, pretrained: str | None):
        super().__init__(spec, clip, pretrained)
        trunk = getattr(clip.visual, "trunk", None)
        if trunk is None or getattr(trunk, "attn_pool", None) is None:
            raise TypeError(f"{spec.model_name}: siglip2 head needs a timm ViT trunk with an attention pool")
        if trunk.num_prefix_tokens:
            raise TypeError(f"{spec.model_name}: siglip2 head expects no prefix tokens")
        self.patch_size = trunk.patch_embed.patch_size[0]
        self.dim = trunk.attn_pool.out_features
        self._pretrain_grid = tuple(trunk.patch_embed.grid_size)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.clip.visual.trunk.blocks

    def param_groups(self) -> dict[str, list[str]]:
        trunk = self.clip.visual.trunk
        base = "visual.trunk"
        groups = {"posembed": [f"{base}.pos_embed"],
                  "patchembed": [f"{base}.patch_embed.{n}" for n, _ in trunk.patch_embed.named_parameters()]}
        for i, blk in enumerate(self.blocks):
            b = f"{base}.blocks.{i}"
            groups[f"blk_{i}"] = [f"{b}.{n}" for n, _ in blk.named_parameters()]
            groups[f"qkv_{i}"] = [f"{b}.attn.qkv.{n}" for n, _ in blk.attn.qkv.named_parameters()]
            groups[f"mlp_{i}"] = [f"{b}.mlp.{n}" for n, _ in blk.mlp.named_parameters()]
        return groups

    def positional_embedding(self, gh: int, gw: int) -> torch.Tensor:
        """Positional embeddings resized to (gh, gw) exactly as timm's dynamic-size path does."""
        from timm.layers import resample_abs_pos_embed

        trunk = self.clip.visual.trunk
        return resample_abs_pos_embed(trunk.pos_embed, new_size=(gh, gw), old_size=self._pretrain_grid,
                                      num_prefix_tokens=0)

    def _dense_tokens(self, x: torch.Tensor) -> torch.Tensor:
        trunk = self.clip.visual.trunk
        p = self.patch_size
        pad_h, pad_w = -x.shape[-2] % p, -x.shape[-1] % p
        if pad_h or pad_w:  # timm's dynamic_img_pad; a no-op for the patch multiples `dense` accepts
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = trunk.patch_embed.proj(x.to(trunk.patch_embed.proj.weight.dtype))
        gh, gw = x.shape[-2:]
        x = trunk.patch_embed.norm(x.flatten(2).transpose(1, 2))
        x = trunk.pos_drop(x + self.positional_embedding(gh, gw).to(x.dtype))
        x = trunk.norm_pre(trunk.patch_drop(x))
        x = trunk.norm(self._run_blocks(trunk.blocks, x))
        pool = trunk.attn_pool
        width = pool.kv.out_features // 2
        bias = pool.kv.bias[width:] if pool.kv.bias is not None else None
        v = pool.proj(F.linear(x, pool.kv.weight[width:], bias))
        return v + pool.mlp(pool.norm(v)) if pool.mlp is not None else v


_HEADS: dict[str, Callable[..., Backbone]] = {"maskclip": MaskCLIPBackbone, "siglip2": SigLIP2Backbone}
# families that are not open_clip models (spar.timm_backbones)
_BUILDERS: dict[str, Callable[..., Backbone]] = dict(timm_backbones.BUILDERS)


def load_backbone(
    name: str,
    pretrained: str | None = DEFAULT,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    init_seed: int = 0,
    storage_options: dict | None = None,
) -> Backbone:
    """Build a registered backbone in eval mode.

    Args:
        name: a registry name (`list_backbones()`) or ``timm:<timm model name>``.
        pretrained: ``"default"`` (the registry's open_clip tag), another open_clip tag, ``None``
            (random init), or a local / fsspec (``s3://``) path to a weights file. ``dinov3txt`` and
            ``timm:`` backbones take a comma-separated list of files (``backbone.pth,dinotxt.pth``;
            see `spar.timm_backbones`), and ``timm:`` also ``"timm"`` (timm's own pretrained weights).
        device, dtype: where and in which dtype to place the parameters.
        init_seed: seed of the random initialisation, so that ``pretrained=None`` is reproducible
            (a cache's teacher and the student built from its fingerprint must agree).
        storage_options: fsspec options (endpoint, credentials) for a remote `pretrained` URL.
    """
    spec = get_spec(name)
    if pretrained == DEFAULT:
        pretrained = spec.default_pretrained
    on_meta = str(device) == "meta"  # shapes only (FLOP counting, planning): no memory, no weights
    if spec.family in _BUILDERS:  # not an open_clip model
        backbone = _BUILDERS[spec.family](spec, pretrained, on_meta=on_meta, init_seed=init_seed,
                                          storage_options=storage_options)
    else:
        resolved = resolve_pretrained(spec.model_name, pretrained, storage_options)
        if on_meta and resolved is not None:
            raise ValueError("device='meta' builds shapes only; use pretrained=None")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            clip = open_clip.create_model(spec.model_name, pretrained=resolved, device="meta" if on_meta else "cpu")
        backbone = _HEADS[spec.family](spec, clip, pretrained)
    if (backbone.patch_size, backbone.dim) != (spec.patch_size, spec.dim):
        raise ValueError(f"{name}: built model has patch {backbone.patch_size} / dim {backbone.dim}, "
                         f"the registry says {spec.patch_size} / {spec.dim}")
    backbone.eval()
    backbone.requires_grad_(False)
    return backbone.to(device=device, dtype=dtype)
