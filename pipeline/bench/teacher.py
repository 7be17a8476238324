"""`benchmark.py teacher` and `benchmark.py speedup`: the sliding-window teacher against the bare
ViT forwards and the GEMM ceiling of the same dtype, and the single pass against the teacher."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Optional

import torch

import spar
from pipeline.bench.common import gemm_ceiling, timed
from pipeline.config import check
from pipeline.devices import AMP_DTYPES, device_name, pick_device, resolve_compute_dtype, use_compute_dtype
from spar.teacher import autocast

DTYPES = ("auto", *AMP_DTYPES)  # auto: what the cache job's teacher would use on this device
SDPA_KERNELS = ("flash", "efficient", "cudnn", "math")  # aten::_scaled_dot_product_<kernel>_attention*


@dataclass(kw_only=True)
class TeacherBench:
    """`benchmark.py teacher`: sliding-window teacher throughput and MFU."""

    backbone: str = "maskclip"  # registry name
    pretrained: Optional[str] = None  # weights do not change speed; random init needs no download
    height: int = 1024  # image size (multiples of the patch)
    width: int = 2048
    images: int = 1  # images per teacher call
    stride: int = 24
    crop: Optional[int] = None  # default: the backbone's window
    dtype: str = "auto"  # auto (bf16 on GPU, float32 on CPU) | float32 | tf32 | bfloat16 | float16
    window_batch: int = 0  # windows per ViT forward; 0 = the teacher's default for the device
    compile: bool = False  # torch.compile the window forward (compile time excluded: one warm-up call)
    repeats: int = 1  # timed repetitions (median reported)
    device: str = "auto"  # auto | cpu | cuda
    out: Optional[str] = None  # optional JSON result path or URL

    def __post_init__(self):
        check(self.dtype in DTYPES, f"dtype must be one of {list(DTYPES)}")
        check(self.repeats >= 1 and self.images >= 1, "repeats and images must be >= 1")


@dataclass(kw_only=True)
class SpeedupBench:
    """`benchmark.py speedup`: single pass vs sliding-window teacher at one resolution."""

    backbone: str = "maskclip"
    pretrained: Optional[str] = None
    height: int = 1024
    width: int = 2048
    stride: int = 24
    dtype: str = "auto"
    window_batch: int = 0
    repeats: int = 1
    device: str = "auto"
    out: Optional[str] = None

    def __post_init__(self):
        check(self.dtype in DTYPES, f"dtype must be one of {list(DTYPES)}")


def _precision(dtype: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    """(compute dtype, autocast dtype) of a benchmark `dtype` on `device`, set up for this process."""
    compute = resolve_compute_dtype(dtype, gpu=device.type == "cuda") if dtype == "auto" else dtype
    return compute, use_compute_dtype(compute, device)


def attention_kernels(fn) -> list[str]:
    """The SDPA kernels (flash / efficient / cudnn / math) that one call of `fn` runs, as the profiler
    names them; [] when attention does not go through SDPA."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    return sorted(k for k in SDPA_KERNELS if any(n.startswith(f"aten::_scaled_dot_product_{k}_attention")
                                                   for n in names))


def bench_teacher(cfg: TeacherBench) -> dict:
    """Measure the teacher and the bare ViT forwards on the same windows, interleaved."""
    device = pick_device(cfg.device)
    compute, amp = _precision(cfg.dtype, device)
    bb = spar.load_backbone(cfg.backbone, pretrained=cfg.pretrained, device=device).drop_text_tower()
    crop = cfg.crop or bb.window
    batch = cfg.window_batch or spar.default_window_batch(bb, crop, device, amp)
    forward = spar.CompiledWindows(bb, batch) if cfg.compile else bb.dense
    x = torch.randn(cfg.images, 3, cfg.height, cfg.width, device=device)
    windows = cfg.images * spar.count_windows(cfg.height, cfg.width, crop, cfg.stride)
    chunk = torch.randn(min(batch, windows), 3, crop, crop, device=device)
    full, rest = divmod(windows, batch)

    def vit_only():
        with torch.no_grad(), autocast(device, amp):
            for _ in range(full):
                forward(chunk)
            if rest:
                forward(chunk[:rest])

    def teacher():
        spar.sliding_window_features(bb, x, crop, cfg.stride, batch, amp, forward=forward)

    def eager_teacher():  # beside the compiled one, so the speed-up is measured side by side
        spar.sliding_window_features(bb, x, crop, cfg.stride, batch, amp)

    from pipeline.plan import window_flops

    # counted on a shape-only model: some CPU attention kernels are invisible to the counter
    flops_per_window = window_flops(spar.load_backbone(cfg.backbone, pretrained=None, device="meta"), crop)
    with torch.no_grad(), autocast(device, amp):
        forward(chunk)  # warm-up (kernels, allocator; compilation)
        if rest:
            forward(chunk[:rest])
        kernels = attention_kernels(lambda: bb.dense(chunk[:2]))  # the eager path; compiled graphs call the same ops
    # the GEMM ceiling is measured beside every repeat: a shared machine's speed drifts over minutes, so
    # MFU is the median of (teacher FLOP/s / the ceiling measured next to it); the best ceiling is kept too
    t_teacher, t_vit, ceilings, t_eager = [], [], [], []
    for _ in range(cfg.repeats):
        t_teacher.append(timed(teacher, device))
        t_vit.append(timed(vit_only, device))
        ceilings.append(gemm_ceiling(device, amp))
        if cfg.compile:
            t_eager.append(timed(eager_teacher, device))
    tt, tv, ceiling = statistics.median(t_teacher), statistics.median(t_vit), statistics.median(ceilings)
    achieved = flops_per_window * windows / tt
    mfu = statistics.median(flops_per_window * windows / t / c for t, c in zip(t_teacher, ceilings))
    compiled = {"eager_teacher_s": statistics.median(t_eager),
                "compile_speedup": statistics.median(e / t for e, t in zip(t_eager, t_teacher))} if cfg.compile else {}
    return {
        "mode": "teacher", "backbone": cfg.backbone, "device": device_name(device), "dtype": compute, **compiled,
        "compile": cfg.compile, "attention_kernels": kernels,
        "threads": torch.get_num_threads(), "image": [cfg.height, cfg.width], "images": cfg.images,
        "crop": crop, "stride": cfg.stride, "window_batch": batch, "windows": windows,
        "teacher_s": tt, "vit_only_s": tv, "windows_per_s": windows / tt, "images_per_s": cfg.images / tt,
        "s_per_image": tt / cfg.images,
        "outside_vit_share": max(0.0, (tt - tv) / tt), "gflop_per_window": flops_per_window / 1e9,
        "model_tflops": achieved / 1e12, "gemm_ceiling_tflops": ceiling / 1e12, "mfu": mfu,
        "mfu_vs_best_ceiling": achieved / max(ceilings),
    }


def bench_speedup(cfg: SpeedupBench) -> dict:
    """Single-pass vs sliding-window wall time on the same image."""
    device = pick_device(cfg.device)
    compute, amp = _precision(cfg.dtype, device)
    bb = spar.load_backbone(cfg.backbone, pretrained=cfg.pretrained, device=device).drop_text_tower()
    x = torch.randn(1, 3, cfg.height, cfg.width, device=device)

    def single():
        with torch.no_grad(), autocast(device, amp):
            bb.dense(x)

    def sliding():
        spar.sliding_window_features(bb, x, None, cfg.stride, cfg.window_batch or None, amp)

    single()  # warm-up
    t_single, t_sliding = [], []
    for _ in range(cfg.repeats):
        t_single.append(timed(single, device))
        t_sliding.append(timed(sliding, device))
    ts, tw = statistics.median(t_single), statistics.median(t_sliding)
    return {
        "mode": "speedup", "backbone": cfg.backbone, "device": device_name(device), "dtype": compute,
        "threads": torch.get_num_threads(), "image": [cfg.height, cfg.width], "stride": cfg.stride,
        "windows": spar.count_windows(cfg.height, cfg.width, bb.window, cfg.stride),
        "single_pass_s": ts, "sliding_window_s": tw, "speedup": tw / ts,
    }
