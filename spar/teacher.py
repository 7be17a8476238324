"""The sliding-window teacher of docs/method.md §2, batched over windows and images.

Windows of every image in a call are laid out in one table and run through the ViT in chunks of
`window_batch`, so memory is bounded by the chunk and the canvases whatever the image size, and
small images share chunks. Window maps are overlap-added onto per-image canvases with one
``index_add_`` per chunk; coverage is the outer product of per-axis counts.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from spar.backbones import Backbone


def upsample_factor(patch: int, stride: int) -> int:
    """Smallest r in 1..p with ``p % r == 0`` and ``stride % (p / r) == 0`` (p=16, stride 24 -> 2)."""
    for r in range(1, patch + 1):
        if patch % r == 0 and stride % (patch // r) == 0:
            return r
    raise AssertionError("unreachable: r = patch always qualifies")


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Window offsets along one axis: 0, s, 2s, ... <= size - crop, plus size - crop if missed."""
    if size < crop:
        raise ValueError(f"image side {size} is smaller than the teacher crop {crop}")
    starts = list(range(0, size - crop + 1, stride))
    if starts[-1] != size - crop:
        starts.append(size - crop)
    return starts


def count_windows(height: int, width: int, crop: int, stride: int) -> int:
    """Number of teacher windows for one H x W image."""
    return len(window_starts(height, crop, stride)) * len(window_starts(width, crop, stride))


def _check_args(backbone: Backbone, height: int, width: int, crop: int, stride: int) -> None:
    p = backbone.patch_size
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if crop % p:
        raise ValueError(f"crop {crop} is not a multiple of the patch size {p}")
    if stride > crop:
        raise ValueError(f"stride {stride} > crop {crop}: windows would leave parts of the image uncovered")
    if height < crop or width < crop:
        raise ValueError(f"image {height}x{width} is smaller than the teacher crop {crop}x{crop}")
    if height % p or width % p:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")


@dataclass
class _Layout:
    """Where every window of every image goes: per-window tables plus per-image canvas geometry."""

    image: torch.Tensor  # (N,) image index of each window
    top: torch.Tensor  # (N,) pixel offsets
    left: torch.Tensor
    canvas_hw: list[tuple[int, int]]  # per image, canvas size at resolution p / r
    canvas_base: list[int]  # per image, offset of its canvas in the flat buffer
    coverage: list[torch.Tensor]  # per image, (Hc, Wc, 1) window count per canvas cell

    @classmethod
    def build(cls, sizes: Sequence[tuple[int, int]], crop: int, stride: int, cell: int, device) -> "_Layout":
        k = crop // cell
        image, top, left, canvas_hw, canvas_base, coverage = [], [], [], [], [], []
        base = 0
        for i, (h, w) in enumerate(sizes):
            ys = torch.tensor(window_starts(h, crop, stride))
            xs = torch.tensor(window_starts(w, crop, stride))
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            top.append(gy.flatten())
            left.append(gx.flatten())
            image.append(torch.full((gy.numel(),), i))
            hc, wc = h // cell, w // cell
            canvas_hw.append((hc, wc))
            canvas_base.append(base)
            base += hc * wc
            cov_y = axis_coverage(ys // cell, k, hc)
            cov_x = axis_coverage(xs // cell, k, wc)
            coverage.append((cov_y[:, None] * cov_x[None, :]).clamp_(min=1).unsqueeze(-1).to(device))
        return cls(torch.cat(image), torch.cat(top), torch.cat(left), canvas_hw, canvas_base, coverage)

    @property
    def num_windows(self) -> int:
        return int(self.image.numel())

    @property
    def canvas_cells(self) -> int:
        hc, wc = self.canvas_hw[-1]
        return self.canvas_base[-1] + hc * wc


def axis_coverage(starts: torch.Tensor, k: int, length: int) -> torch.Tensor:
    """How many windows of side `k` starting at `starts` cover each of `length` positions."""
    pos = torch.arange(length)
    return ((pos[None] >= starts[:, None]) & (pos[None] < starts[:, None] + k)).sum(0).float()


def _gather_windows(images: Sequence[torch.Tensor], layout: _Layout, sel: slice, crop: int) -> torch.Tensor:
    """Crops for windows `sel` as ``(n, 3, crop, crop)``; one gather per image the chunk touches."""
    img_idx, top, left = layout.image[sel], layout.top[sel], layout.left[sel]
    ar = torch.arange(crop)
    parts = []
    for i in torch.unique_consecutive(img_idx).tolist():
        m = img_idx == i
        img = images[i]
        rows = (top[m][:, None] + ar).to(img.device)
        cols = (left[m][:, None] + ar).to(img.device)
        parts.append(img[:, rows[:, :, None], cols[:, None, :]].transpose(0, 1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`, or nothing for None / float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def iter_window_chunks(total: int, window_batch: int) -> Iterator[slice]:
    """Consecutive slices of at most `window_batch` windows."""
    for start in range(0, total, window_batch):
        yield slice(start, min(start + window_batch, total))


@torch.no_grad()
def sliding_window_features_many(
    backbone: Backbone,
    images: Sequence[torch.Tensor],
    crop: int | None = None,
    stride: int = 24,
    window_batch: int = 64,
    amp_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Teacher maps of images of different sizes, their windows batched together.

    Args:
        images: normalised float tensors ``(3, H_i, W_i)``, sides multiples of the patch, >= crop.
        crop: window side (default: the backbone's pre-training resolution).
        stride: window stride in pixels.
        window_batch: windows per ViT forward; bounds memory.
        amp_dtype: ``torch.bfloat16`` / ``torch.float16`` to autocast the ViT (accumulation stays float32).

    Returns: one ``(H_i/p, W_i/p, D)`` float32 map per image, on the images' device.
    """
    crop = crop or backbone.window
    p = backbone.patch_size
    for img in images:
        if img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"expected (3, H, W) images, got shape {tuple(img.shape)}")
        _check_args(backbone, img.shape[1], img.shape[2], crop, stride)
    if window_batch < 1:
        raise ValueError(f"window_batch must be >= 1, got {window_batch}")
    device = images[0].device
    r = upsample_factor(p, stride)
    cell = p // r  # canvas resolution in pixels
    k = crop // cell  # window map side on the canvas
    layout = _Layout.build([tuple(img.shape[1:]) for img in images], crop, stride, cell, device)
    canvas = torch.zeros(layout.canvas_cells, backbone.dim, device=device, dtype=torch.float32)
    wc = torch.tensor([hw[1] for hw in layout.canvas_hw])
    base = torch.tensor(layout.canvas_base)
    offs = torch.arange(k)

    for sel in iter_window_chunks(layout.num_windows, window_batch):
        crops = _gather_windows(images, layout, sel, crop)
        with autocast(device, amp_dtype):
            maps = backbone.dense(crops)  # (n, g, g, D) float32
        if r > 1:
            maps = F.interpolate(maps.permute(0, 3, 1, 2), scale_factor=r, mode="bilinear",
                                 align_corners=False).permute(0, 2, 3, 1)
        img_idx = layout.image[sel]
        rows = layout.top[sel] // cell
        cols = layout.left[sel] // cell
        flat = (base[img_idx][:, None, None] + (rows[:, None, None] + offs[None, :, None]) * wc[img_idx][:, None, None]
                + cols[:, None, None] + offs[None, None, :])
        canvas.index_add_(0, flat.flatten().to(device), maps.reshape(-1, backbone.dim))

    out = []
    for (hc, wc_i), b, cov, img in zip(layout.canvas_hw, layout.canvas_base, layout.coverage, images):
        avg = canvas[b:b + hc * wc_i].view(hc, wc_i, -1) / cov
        h, w = img.shape[1] // p, img.shape[2] // p
        if (hc, wc_i) != (h, w):
            avg = F.interpolate(avg.permute(2, 0, 1)[None], size=(h, w), mode="bilinear",
                                align_corners=False)[0].permute(1, 2, 0)
        out.append(avg.contiguous())
    return out


def sliding_window_features(
    backbone: Backbone,
    x: torch.Tensor,
    crop: int | None = None,
    stride: int = 24,
    window_batch: int = 64,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The teacher of docs/method.md §2: normalised ``(B, 3, H, W)`` -> ``(B, H/p, W/p, D)`` float32.

    See `sliding_window_features_many` for the arguments; this is the same computation for a batch
    of equally sized images.
    """
    if x.ndim != 4:
        raise ValueError(f"expected a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
    return torch.stack(sliding_window_features_many(backbone, list(x), crop, stride, window_batch, amp_dtype))
