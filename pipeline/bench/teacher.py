"""`benchmark.py teacher` and `benchmark.py speedup`: the sliding-window teacher against the bare
ViT forwards and the GEMM ceiling of the same dtype, and the single pass against the teacher."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import spar
from pipeline.bench.common import gemm_ceiling, timed
from pipeline.config import check
from pipeline.devices import (AMP_DTYPES, device_name, keep_freed_memory, pick_device, resolve_compute_dtype,
                              use_compute_dtype)
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
    # where the GEMM ceiling is sampled: "interleaved" (before every window chunk: the teacher and
    # the ceiling see the same machine state; "auto" on CPUs) or "beside" (around every repeat; "auto"
    # on GPUs, whose window loop must not wait for the host)
    ceiling: str = "auto"
    # CPU: also time one window chunk's forward with freed memory kept (`keep_freed_memory`) against
    # glibc's default, alternated in both orders in this process
    malloc_compare: bool = False
    out: Optional[str] = None  # optional JSON result path or URL

    def __post_init__(self):
        check(self.dtype in DTYPES, f"dtype must be one of {list(DTYPES)}")
        check(self.repeats >= 1 and self.images >= 1, "repeats and images must be >= 1")
        check(self.ceiling in ("auto", "interleaved", "beside"), "ceiling must be auto, interleaved or beside")


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


class InterleavedCeiling:
    """A window forward that first runs a sample of the GEMM ceiling, timed apart.

    On a shared CPU the GEMM rate swings by 2-3x within seconds, so a ceiling measured around a
    whole teacher call can catch a faster (or slower) moment than the teacher ran in. Sampling it
    before every chunk, for about `share` of the chunk's FLOP, puts both in the same moments: the
    teacher's time is the call's wall time less `seconds`, and the ceiling is `flop / seconds`.
    The forwards are timed too (`forward_seconds`; the CPU runs them synchronously): the rest of the
    teacher's time is spent outside the ViT, measured in the same call. `beside`, another forward
    (the eager one beside a compiled one), runs on every chunk too and is timed apart
    (`beside_seconds`), so the two are compared on the same chunks in the same moments.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], flop_per_window: float,
                 device: torch.device, amp: torch.dtype | None, share: float = 0.5, n: int = 2048,
                 beside: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.forward, self.beside, self.flop_per_window, self.share = forward, beside, flop_per_window, share
        self.a = torch.randn(n, n, device=device, dtype=amp or torch.float32)
        self.gemm_flop = 2 * n ** 3
        self.seconds = self.flop = self.forward_seconds = self.beside_seconds = 0.0

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        gemms = max(1, round(self.share * self.flop_per_window * crops.shape[0] / self.gemm_flop))
        t = time.perf_counter()
        for _ in range(gemms):
            self.a @ self.a
        self.seconds += time.perf_counter() - t
        self.flop += gemms * self.gemm_flop
        if self.beside is not None:
            t = time.perf_counter()
            self.beside(crops)
            self.beside_seconds += time.perf_counter() - t
        t = time.perf_counter()
        out = self.forward(crops)
        self.forward_seconds += time.perf_counter() - t
        return out


def freed_memory_comparison(forward: Callable[[torch.Tensor], torch.Tensor], chunk: torch.Tensor,
                            amp: torch.dtype | None, rounds: int) -> dict:
    """One chunk's forward with freed memory kept and with glibc's default, alternated `rounds` times
    (each order in turn): the median speed-up of keeping, and the page faults of a forward in each."""
    import resource

    def forward_once(keep: bool) -> tuple[float, int]:
        keep_freed_memory(keep)
        with torch.no_grad(), autocast(chunk.device, amp):
            for _ in range(2):  # settles the heap in this mode
                forward(chunk)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = time.perf_counter()
            forward(chunk)
            return time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    runs = {True: [], False: []}
    for r in range(rounds):
        for keep in (True, False) if r % 2 == 0 else (False, True):
            runs[keep].append(forward_once(keep))
    keep_freed_memory(True)
    return {"freed_memory_kept_speedup": statistics.median(d[0] / k[0] for k, d in zip(runs[True], runs[False])),
            "page_faults_per_forward": {"kept": statistics.median(k[1] for k in runs[True]),
                                        "glibc_default": statistics.median(d[1] for d in runs[False])}}


def bench_teacher(cfg: TeacherBench) -> dict:
    """Measure the teacher, its time in the ViT forwards and the GEMM ceiling beside it."""
    device = pick_device(cfg.device)
    check(not cfg.malloc_compare or (device.type == "cpu" and keep_freed_memory()),
          "malloc_compare=true needs a CPU device and glibc")
    compute, amp = _precision(cfg.dtype, device)
    bb = spar.load_backbone(cfg.backbone, pretrained=cfg.pretrained, device=device).drop_text_tower()
    crop = cfg.crop or bb.window
    batch = cfg.window_batch or spar.default_window_batch(bb, crop, device, amp)
    forward = spar.CompiledWindows(bb, batch) if cfg.compile else bb.dense
    x = torch.randn(cfg.images, 3, cfg.height, cfg.width, device=device)
    windows = cfg.images * spar.count_windows(cfg.height, cfg.width, crop, cfg.stride)
    chunk = torch.randn(min(batch, windows), 3, crop, crop, device=device)
    full, rest = divmod(windows, batch)

    def vit_only(fwd):  # the bare forwards of as many windows, for the "beside" method
        with torch.no_grad(), autocast(device, amp):
            for _ in range(full):
                fwd(chunk)
            if rest:
                fwd(chunk[:rest])

    from pipeline.plan import window_flops

    # counted on a shape-only model: some CPU attention kernels are invisible to the counter
    flops_per_window = window_flops(spar.load_backbone(cfg.backbone, pretrained=None, device="meta"), crop)
    with torch.no_grad(), autocast(device, amp):
        forward(chunk)  # warm-up (kernels, allocator; compilation)
        if rest:
            forward(chunk[:rest])
        kernels = attention_kernels(lambda: bb.dense(chunk[:2]))  # the eager path; compiled graphs call the same ops
    method = cfg.ceiling if cfg.ceiling != "auto" else "beside" if device.type == "cuda" else "interleaved"

    def teacher() -> tuple[float, float, float, float | None]:
        """One timed teacher call: (teacher s, its ViT s, ceiling FLOP/s, the eager teacher's s when
        compiled: measured on the same chunks (interleaved) or by a second call (beside))."""
        if method == "beside":
            t = timed(lambda: spar.sliding_window_features(bb, x, crop, cfg.stride, batch, amp, forward=forward),
                      device)
            vit, ceiling = timed(lambda: vit_only(forward), device), gemm_ceiling(device, amp)
            eager = timed(lambda: spar.sliding_window_features(bb, x, crop, cfg.stride, batch, amp),
                          device) if cfg.compile else None
            return t, vit, ceiling, eager
        paired = InterleavedCeiling(forward, flops_per_window, device, amp, beside=bb.dense if cfg.compile else None)
        wall = timed(lambda: spar.sliding_window_features(bb, x, crop, cfg.stride, batch, amp, forward=paired), device)
        t = wall - paired.seconds - paired.beside_seconds
        eager = t - paired.forward_seconds + paired.beside_seconds if cfg.compile else None
        return t, paired.forward_seconds, paired.flop / paired.seconds, eager

    # MFU is the median over repeats of (teacher FLOP/s / the ceiling of that repeat); a best-of-5 square
    # GEMM after every repeat is kept too (the ceiling itself when method is "beside")
    t_teacher, t_vit, ceilings, best_ceilings, t_eager = [], [], [], [], []
    for _ in range(cfg.repeats):
        t, v, c, e = teacher()
        t_teacher.append(t), t_vit.append(v), ceilings.append(c), t_eager.append(e)
        best_ceilings.append(c if method == "beside" else gemm_ceiling(device, amp))
    tt, tv, ceiling = statistics.median(t_teacher), statistics.median(t_vit), statistics.median(ceilings)
    achieved = flops_per_window * windows / tt
    mfu = statistics.median(flops_per_window * windows / t / c for t, c in zip(t_teacher, ceilings))
    malloc = freed_memory_comparison(forward, chunk, amp, max(2, cfg.repeats)) if cfg.malloc_compare else {}
    compiled = {"eager_teacher_s": statistics.median(t_eager),
                "eager_mfu": statistics.median(flops_per_window * windows / e / c for e, c in zip(t_eager, ceilings)),
                "compile_speedup": statistics.median(e / t for e, t in zip(t_eager, t_teacher))} if cfg.compile else {}
    return {
        "mode": "teacher", "backbone": cfg.backbone, "device": device_name(device), "dtype": compute, **compiled, **malloc,
        "compile": cfg.compile, "attention_kernels": kernels,
        "threads": torch.get_num_threads(), "image": [cfg.height, cfg.width], "images": cfg.images,
        "crop": crop, "stride": cfg.stride, "window_batch": batch, "windows": windows,
        "teacher_s": tt, "vit_only_s": tv, "windows_per_s": windows / tt, "images_per_s": cfg.images / tt,
        "s_per_image": tt / cfg.images,
        "outside_vit_share": max(0.0, (tt - tv) / tt), "gflop_per_window": flops_per_window / 1e9,
        "model_tflops": achieved / 1e12, "ceiling_method": method, "gemm_ceiling_tflops": ceiling / 1e12,
        "mfu": mfu, "best_ceiling_tflops": max(best_ceilings) / 1e12,
        "mfu_vs_best_ceiling": achieved / max(best_ceilings),
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
