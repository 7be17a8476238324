"""The `Backbone` interface every registry entry returns, and the `BackboneSpec` it is built from.

`spar.backbones` (the registry and the open_clip families) and `spar.timm_backbones` (DINOv3.txt and
any timm ViT) both build on these, so the library reads bottom-up: interface -> families -> registry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from spar.weights import public_url


@dataclass(frozen=True)
class BackboneSpec:
    """What a registry entry builds."""

    name: str  # spar's name, e.g. "maskclip"
    model_name: str  # open_clip model name (the timm model name for dinov3txt and timm:)
    family: str  # "maskclip" | "siglip2" | "dinov3txt" | "timm": which dense head
    default_pretrained: str | None  # open_clip tag used when pretrained=DEFAULT ("default": user-supplied only)
    window: int  # pre-training resolution: the teacher's crop
    patch_size: int  # ViT patch side
    dim: int  # dense feature dimension D
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # the text side: "open_clip" (the open_clip model's), a `spar.dinotxt.TEXT_CONFIGS` name, or None
    # (no text: cache and train only; evaluation and segmentation refuse the backbone)
    text_tower: str | None = "open_clip"

    @property
    def has_text(self) -> bool:
        """Whether the backbone can embed class names (evaluation, segmentation)."""
        return self.text_tower is not None


class Backbone(nn.Module):
    """A ViT (an open_clip model, or `spar.timm_backbones.TimmTowers`) plus the dense single-pass forward
    of docs/method.md §1.

    Attributes: ``clip`` (the open_clip model), ``name``, ``model_name``, ``pretrained``,
    ``patch_size``, ``window``, ``dim``, ``mean``, ``std``.
    """

    def __init__(self, spec: BackboneSpec, clip: nn.Module, pretrained: str | None):
        super().__init__()
        self.spec = spec
        self.clip = clip
        self.name = spec.name
        self.model_name = spec.model_name
        self.pretrained = pretrained
        self.window = spec.window
        self.mean = spec.mean
        self.std = spec.std
        self.grad_checkpointing = False
        self.register_buffer("_mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    # -- what subclasses provide ------------------------------------------------------------
    patch_size: int
    dim: int
    patch_fit = "crop"  # how segmentation fits any image to the patch grid: crop | pad | stretch (spar.segment)
    export_layout = "open_clip"  # what `open_clip_state_dict` (and so `spar.export_open_clip`) writes

    @property
    def blocks(self) -> Sequence[nn.Module]:
        """The transformer blocks, first to last."""
        raise NotImplementedError

    def param_groups(self) -> dict[str, list[str]]:
        """Named parameter groups for the trainable spec: posembed, patchembed, blk_i, qkv_i, mlp_i."""
        raise NotImplementedError

    def _dense_tokens(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------
    @property
    def vision(self) -> nn.Module:
        """The image tower (``clip.visual``)."""
        return self.clip.visual

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images ``(H, W, 3)`` or ``(B, H, W, 3)`` (channels last, as decoded) -> normalised
        float ``(B, 3, H, W)`` on this backbone's device, in float32."""
        if images.dtype != torch.uint8:
            raise TypeError(f"normalize expects uint8 images, got {images.dtype}")
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"normalize expects (B, H, W, 3) uint8, got shape {tuple(images.shape)}")
        x = images.to(self._mean.device).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self._mean.float()) / self._std.float()

    def check_input(self, x: torch.Tensor) -> None:
        """ValueError unless `x` is ``(B, 3, H, W)`` with H and W multiples of the patch size."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of the patch size {p}; crop or resize to "
                f"{h // p * p}x{w // p * p} (or pad) first"
            )

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """Single pass: normalised ``(B, 3, H, W)``, H and W multiples of p -> ``(B, H/p, W/p, D)`` float32."""
        self.check_input(x)
        tokens = self._dense_tokens(x)
        b, (h, w) = x.shape[0], x.shape[-2:]
        return tokens.reshape(b, h // self.patch_size, w // self.patch_size, -1).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (for large resolutions); only blocks that take
        part in autograd are affected, frozen leading blocks store nothing anyway."""
        self.grad_checkpointing = enable

    def _run_blocks(self, blocks: Sequence[nn.Module], x: torch.Tensor,
                    block_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """``x`` through `blocks` in turn, each as ``block_fn(blk, x)`` (default: ``blk(x)``)."""
        block_fn = block_fn or _call_block
        for blk in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block_fn, blk, x, use_reentrant=False)
            else:
                x = block_fn(blk, x)
        return x

    def set_rope_rescale(self, factor: float | None) -> None:
        """Train-mode RoPE coordinate rescaling (DINOv3 backbones only)."""
        if factor is not None:
            raise ValueError(f"backbone {self.name} has no RoPE: rope_rescale applies to dinov3txt only")

    def drop_text_tower(self) -> "Backbone":
        """Keep only the image tower (``clip.visual``): less memory for teachers and students that
        never embed text. `open_clip_state_dict` then holds the image tower only."""
        self.clip = _VisionOnly(self.clip.visual)
        return self

    def open_clip_state_dict(self) -> dict[str, torch.Tensor]:
        """The full open_clip state dict (image and text towers), loadable by open_clip as is."""
        return self.clip.state_dict()

    def extra_repr(self) -> str:
        return (f"name={self.name}, pretrained={public_url(self.pretrained)}, patch={self.patch_size}, "
                f"window={self.window}, dim={self.dim}")


class _VisionOnly(nn.Module):
    """Stands in for an open_clip model whose text tower was dropped."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual


def _call_block(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return blk(x)
