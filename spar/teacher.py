"""The sliding-window teacher of docs/method.md §2, batched over windows and images.

Windows of every image in a call are laid out in one table and run through the ViT in chunks of
`window_batch`, so memory is bounded by the chunk and the canvases whatever the image size, and
small images share chunks. Crops are gathered from one flat pixel buffer and window maps are
overlap-added onto one flat canvas through index tables built on the device once per call, so the
window loop never waits for the host; coverage is the outer product of per-axis counts.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from spar.interface import Backbone


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
    """Where every window of every image goes, as device tensors built once per call.

    Images are read from one flat ``(3, sum H_i W_i)`` pixel buffer and windows are added onto one
    flat canvas of all images' cells, so a chunk of windows is one gather and one ``index_add_``
    whichever images it spans, and nothing inside the window loop waits for the host.
    """

    pixel: torch.Tensor  # (N,) flat pixel offset of each window's top-left corner
    row_stride: torch.Tensor  # (N,) pixel row length (image width) of each window's image
    cell: torch.Tensor  # (N,) flat canvas offset of each window's top-left cell
    cell_stride: torch.Tensor  # (N,) canvas row length of each window's image
    canvas_hw: list[tuple[int, int]]  # per image, canvas size at resolution p / r
    canvas_base: list[int]  # per image, offset of its canvas in the flat buffer
    coverage: list[torch.Tensor]  # per image, (Hc, Wc, 1) window count per canvas cell

    @classmethod
    def build(cls, sizes: Sequence[tuple[int, int]], crop: int, stride: int, cell: int, device) -> "_Layout":
        k = crop // cell
        pixel, row_stride, cells, cell_stride, canvas_hw, canvas_base, coverage = [], [], [], [], [], [], []
        pix_base = base = 0
        for h, w in sizes:
            ys = torch.tensor(window_starts(h, crop, stride))
            xs = torch.tensor(window_starts(w, crop, stride))
            gy, gx = (t.flatten() for t in torch.meshgrid(ys, xs, indexing="ij"))
            hc, wc = h // cell, w // cell
            pixel.append(pix_base + gy * w + gx)
            row_stride.append(torch.full_like(gy, w))
            cells.append(base + gy // cell * wc + gx // cell)
            cell_stride.append(torch.full_like(gy, wc))
            canvas_hw.append((hc, wc))
            canvas_base.append(base)
            pix_base += h * w
            base += hc * wc
            cov_y = axis_coverage(ys // cell, k, hc)
            cov_x = axis_coverage(xs // cell, k, wc)
            coverage.append((cov_y[:, None] * cov_x[None, :]).clamp_(min=1).unsqueeze(-1).to(device))
        tables = (torch.cat(t).to(device) for t in (pixel, row_stride, cells, cell_stride))
        return cls(*tables, canvas_hw, canvas_base, coverage)

    @property
    def num_windows(self) -> int:
        return int(self.pixel.numel())

    @property
    def canvas_cells(self) -> int:
        hc, wc = self.canvas_hw[-1]
        return self.canvas_base[-1] + hc * wc


def axis_coverage(starts: torch.Tensor, k: int, length: int) -> torch.Tensor:
    """How many windows of side `k` starting at `starts` cover each of `length` positions."""
    pos = torch.arange(length)
    return ((pos[None] >= starts[:, None]) & (pos[None] < starts[:, None] + k)).sum(0).float()


def _grid_index(origin: torch.Tensor, row: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """Flat indices ``(n, k, k)`` of the k x k squares at flat offsets `origin` of row length `row`."""
    return origin[:, None, None] + side[None, :, None] * row[:, None, None] + side[None, None, :]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`, or nothing for None / float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def iter_window_chunks(total: int, window_batch: int) -> Iterator[slice]:
    """Consecutive slices of at most `window_batch` windows."""
    for start in range(0, total, window_batch):
        yield slice(start, min(start + window_batch, total))


CPU_WINDOW_BATCH = 64  # GEMMs of 64 x 197 tokens already run at the CPU's peak; more only costs memory
GPU_WINDOW_BATCH = 256  # large enough to fill an H100 with ViT-B windows; capped by free memory below


def default_window_batch(backbone: Backbone, crop: int, device: torch.device,
                         amp_dtype: torch.dtype | None = None) -> int:
    """Windows per forward for `device`: 64 on CPU; on a GPU 256, or fewer when a quarter of the
    free memory cannot hold that many windows' activations. The estimate is deliberately generous:
    tokens x the widest layer (the MLP's hidden width) x 12 activations, plus the float32 window maps
    upsampled x2."""
    if device.type != "cuda":
        return CPU_WINDOW_BATCH
    free, _ = torch.cuda.mem_get_info(device)
    tokens = (crop // backbone.patch_size) ** 2 + 8  # prefix tokens: class, registers
    width = max(p.shape[-1] for p in backbone.parameters() if p.ndim == 2)
    act_bytes = 2 if amp_dtype in (torch.bfloat16, torch.float16) else 4
    r = 2  # the largest upsampling of the paper's strides (24 on patch 16)
    per_window = tokens * width * act_bytes * 12 + (crop // backbone.patch_size * r) ** 2 * backbone.dim * 4 * 2
    fits = int(free // 4 // per_window)
    return max(1, min(GPU_WINDOW_BATCH, 1 << max(0, fits.bit_length() - 1)))


class CompiledWindows:
    """``backbone.dense`` compiled for one window batch shape (`torch.compile`, static shapes).

    Every window has the same shape, so one graph serves every chunk: smaller chunks (the last
    one of a call) are padded to `window_batch` with zero windows whose outputs are dropped. The
    teacher is frozen, so its weights are compiled in as constants (inductor's ``freezing``: weights
    prepacked for the GEMM library, bias and activation fused into it; 1.17x eager bf16 per window on a
    2-core AMX CPU, measured on the same chunks):
    later changes to the backbone's weights are not seen. `cuda_graphs` replays the graph as a CUDA
    graph (GPUs only).
    """

    def __init__(self, backbone: Backbone, window_batch: int, freeze: bool = True, cuda_graphs: bool = False):
        self.window_batch, self.freeze = window_batch, freeze
        self.fn = torch.compile(backbone.dense, dynamic=False, options={"triton.cudagraphs": cuda_graphs})

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        n = crops.shape[0]
        if n < self.window_batch:
            crops = torch.cat([crops, crops.new_zeros(self.window_batch - n, *crops.shape[1:])])
        # inductor reads `freezing` from its global config when it compiles (on a first or new call):
        # passed in torch.compile's options it is silently not applied, and GEMMs stay plain addmm
        with torch._inductor.config.patch(freezing=self.freeze):
            return self.fn(crops)[:n]


@torch.no_grad()
def sliding_window_features_many(
    backbone: Backbone,
    images: Sequence[torch.Tensor],
    crop: int | None = None,
    stride: int = 24,
    window_batch: int | None = None,
    amp_dtype: torch.dtype | None = None,
    *,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Teacher maps of images of different sizes, their windows batched together.

    Args:
        images: normalised float tensors ``(3, H_i, W_i)``, sides multiples of the patch, >= crop.
        crop: window side (default: the backbone's pre-training resolution).
        stride: window stride in pixels.
        window_batch: windows per ViT forward; bounds memory (default: `default_window_batch`).
        amp_dtype: ``torch.bfloat16`` / ``torch.float16`` to autocast the ViT (accumulation stays float32).
        forward: the window forward ``(n, 3, crop, crop) -> (n, crop/p, crop/p, D)``, e.g. a
            `CompiledWindows` (default: ``backbone.dense``).

    Returns: one ``(H_i/p, W_i/p, D)`` float32 map per image, on the images' device.
    """
    crop = crop or backbone.window
    p = backbone.patch_size
    for img in images:
        if img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"expected (3, H, W) images, got shape {tuple(img.shape)}")
        _check_args(backbone, img.shape[1], img.shape[2], crop, stride)
    device = images[0].device
    if window_batch is None:
        window_batch = default_window_batch(backbone, crop, device, amp_dtype)
    if window_batch < 1:
        raise ValueError(f"window_batch must be >= 1, got {window_batch}")
    forward = forward or backbone.dense
    r = upsample_factor(p, stride)
    cell = p // r  # canvas resolution in pixels
    k = crop // cell  # window map side on the canvas
    layout = _Layout.build([tuple(img.shape[1:]) for img in images], crop, stride, cell, device)
    pixels = torch.cat([img.reshape(3, -1) for img in images], dim=1) if len(images) > 1 else images[0].reshape(3, -1)
    canvas = torch.zeros(layout.canvas_cells, backbone.dim, device=device, dtype=torch.float32)
    crop_side = torch.arange(crop, device=device)
    map_side = torch.arange(k, device=device)

    for sel in iter_window_chunks(layout.num_windows, window_batch):
        idx = _grid_index(layout.pixel[sel], layout.row_stride[sel], crop_side)
        crops = pixels[:, idx].transpose(0, 1).contiguous()  # (n, 3, crop, crop); one layout for compiled forwards
        with autocast(device, amp_dtype):
            maps = forward(crops).float()  # (n, g, g, D)
        if r > 1:
            maps = F.interpolate(maps.permute(0, 3, 1, 2), scale_factor=r, mode="bilinear",
                                 align_corners=False).permute(0, 2, 3, 1)
        cells = _grid_index(layout.cell[sel], layout.cell_stride[sel], map_side)
        canvas.index_add_(0, cells.flatten(), maps.reshape(-1, backbone.dim))

    out = []
    for (hc, wc), b, cov, img in zip(layout.canvas_hw, layout.canvas_base, layout.coverage, images):
        avg = canvas[b:b + hc * wc].view(hc, wc, -1) / cov
        h, w = img.shape[1] // p, img.shape[2] // p
        if (hc, wc) != (h, w):
            avg = F.interpolate(avg.permute(2, 0, 1)[None], size=(h, w), mode="bilinear",
                                align_corners=False)[0].permute(1, 2, 0)
        out.append(avg.contiguous())
    return out


def sliding_window_features(
    backbone: Backbone,
    x: torch.Tensor,
    crop: int | None = None,
    stride: int = 24,
    window_batch: int | None = None,
    amp_dtype: torch.dtype | None = None,
    *,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The teacher of docs/method.md §2: normalised ``(B, 3, H, W)`` -> ``(B, H/p, W/p, D)`` float32.

    See `sliding_window_features_many` for the arguments; this is the same computation for a batch
    of equally sized images.
    """
    if x.ndim != 4:
        raise ValueError(f"expected a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
    return torch.stack(sliding_window_features_many(backbone, list(x), crop, stride, window_batch, amp_dtype,
                                                    forward=forward))
