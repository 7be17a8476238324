"""Size a cache + training run before paying for it: `python jobs/plan.py images=25000 gpus=8 ...`.

Windows come from `spar.count_windows` over the augmented sizes (drawn with the job's own
augmentation code from a typical source size, or one fixed resolution); FLOPs are counted by
torch's FlopCounterMode on a shape-only (meta) model: per teacher window, and per student step
(forward + backward of the trainable blocks) at three sampled sizes, the quadratic in the token
count through them giving every other size exactly. Throughput is a measured windows/s or
images/s per GPU if you have one (`jobs/benchmark.py`), else peak x MFU, the peak
of the precision the cache job's GPU teacher will run in (`teacher_amp_dtype`, resolved as the
job resolves it). Loader cores per GPU follow from the training rate and the loader's measured
seconds per sample of one core, from a model fitted to `jobs/benchmark.py loader` (below).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

import spar
from pipeline.cache.augment import AugmentConfig, plan_view
from pipeline.cache.encode import DEFAULT_IMAGE_ENCODING, IMAGE_ENCODINGS
from pipeline.config import check
from pipeline.devices import REQUESTABLE, resolve_compute_dtype

BYTES_PER_VALUE = {"float16": 2, "float32": 4, "int8": 1}
# dense peak of each compute dtype relative to bf16 (H100 SXM: 989 bf16/fp16, 495 TF32, 67 fp32 TFLOP/s)
PEAK_RATIO = {"bfloat16": 1.0, "float16": 1.0, "tf32": 0.5, "float32": 67 / 989}
# One loader core's seconds per sample = bytes read x LOADER_S_PER_BYTE (+ pixels x PNG_S_PER_PIXEL for
# PNG), fitted to `jobs/benchmark.py loader` at 1024 x 2048 with float16 D=512 targets, checksums on
# (Xeon, 2 cores, local disk): raw 61.2 samples/s of 14.69 MB; PNG 9.7 samples/s of 13.06 MB.
LOADER_S_PER_BYTE = 1 / 61.2 / 14.69e6
PNG_S_PER_PIXEL = (1 / 9.7 - 13.06e6 * LOADER_S_PER_BYTE) / (1024 * 2048)
RAW_HEADER_BYTES = 128  # .npy header of a raw image member


@dataclass(kw_only=True)
class PlanConfig:
    """`jobs/plan.py`: what a cache + training run costs."""

    images: int = 25_000  # source images (SA-1B: the first 25K)
    views: int = 1
    source_size: list[int] = field(default_factory=lambda: [1500, 2250])  # typical source (h, w); SA-1B
    resolution: Optional[list[int]] = None  # fixed augmented (h, w) instead of sampling the augmentation
    draws: int = 256  # augmentation draws used to estimate sizes
    backbone: str = "maskclip"
    crop: Optional[int] = None
    stride: int = 24
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    trainable: str = spar.DEFAULT_TRAINABLE
    gpus: int = 8
    peak_tflops: float = 800.0  # per GPU, dense bf16 (H100 SXM ~ 800-990); other precisions scale by PEAK_RATIO
    teacher_amp_dtype: str = "auto"  # the cache job's teacher.amp_dtype: auto = bf16 on GPU; float32 = TF32
    strict_fp32: bool = False  # the cache job's teacher.strict_fp32 (float32 without TF32)
    mfu: float = 0.5  # assumed teacher model-FLOP utilisation, if no measured rate
    teacher_windows_per_s: Optional[float] = None  # measured per GPU (overrides peak x mfu)
    train_mfu: float = 0.5
    train_images_per_s: Optional[float] = None  # measured per GPU (overrides peak x train_mfu)
    epochs: int = 10
    shard_size: int = 32
    image_encoding: str = DEFAULT_IMAGE_ENCODING  # raw | png: bytes per sample and loader cores
    png_bytes_per_pixel: float = 1.8  # lossless PNG of photos: ~1.5-2 B/px (raw: 3 B/px)
    loader_samples_per_s_per_core: Optional[float] = None  # measured at the plan's sizes (default: the fitted model)

    def __post_init__(self):
        spar.get_spec(self.backbone)
        check(self.image_encoding in IMAGE_ENCODINGS, f"image_encoding must be one of {IMAGE_ENCODINGS}")
        check(self.teacher_amp_dtype in REQUESTABLE, f"teacher_amp_dtype must be one of {REQUESTABLE}")
        check(self.images >= 1 and self.views >= 1 and self.gpus >= 1, "images, views, gpus must be >= 1")
        check(self.resolution is None or len(self.resolution) == 2, "resolution must be [h, w]")


def augmented_sizes(cfg: PlanConfig) -> list[tuple[int, int]]:
    """Sizes the cache job would produce (or the fixed resolution)."""
    if cfg.resolution:
        return [tuple(cfg.resolution)]
    h, w = cfg.source_size
    out = []
    for i in range(cfg.draws):
        _, _, ch, cw = plan_view(h, w, 0, f"plan-{i}", 0, cfg.augment)["crop"]
        out.append((ch, cw))
    return out


def _flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def window_flops(bb: spar.Backbone, crop: int) -> int:
    """FLOPs of one teacher window (dense forward at crop x crop)."""
    with torch.no_grad():
        return _flops(lambda: bb.dense(torch.empty(1, 3, crop, crop, device="meta")))


def student_step_flops(bb: spar.Backbone, height: int, width: int) -> int:
    """FLOPs of one student step at one size: forward, plus backward through the trainable blocks
    (`bb` is a meta-device backbone with its trainable parameters set)."""

    def step():
        out = bb.dense(torch.empty(1, 3, height, width, device="meta"))
        out.float().square().mean().backward()

    return _flops(step)


def mean_student_step_flops(bb: spar.Backbone, sizes: list[tuple[int, int]], patch: int) -> float:
    """Mean FLOPs of a student step over `sizes`. A step's FLOPs are a quadratic in its token count
    n (patch embedding, projections and MLPs grow with n, attention with n^2), so they are counted at
    three sizes with distinct n (fewer if the sizes have fewer) and the quadratic through those
    counts gives every other size exactly."""
    by_tokens = {(h // patch) * (w // patch): (h, w) for h, w in sizes}
    ns = sorted(by_tokens)
    known = [ns[0], ns[len(ns) // 2], ns[-1]] if len(ns) > 3 else ns
    counted = {n: student_step_flops(bb, *by_tokens[n]) for n in known}  # distinct: ns is sorted and unique
    if len(counted) < 3:
        return statistics.fmean(counted[(h // patch) * (w // patch)] for h, w in sizes)
    (n0, f0), (n1, f1), (n2, f2) = counted.items()

    def at(n: int) -> Fraction:  # Lagrange form: exact in integers
        return (f0 * Fraction((n - n1) * (n - n2), (n0 - n1) * (n0 - n2))
                + f1 * Fraction((n - n0) * (n - n2), (n1 - n0) * (n1 - n2))
                + f2 * Fraction((n - n0) * (n - n1), (n2 - n0) * (n2 - n1)))

    return float(sum(at((h // patch) * (w // patch)) for h, w in sizes) / len(sizes))


def plan(cfg: PlanConfig) -> dict:
    """The estimate (see the module docstring)."""
    spec = spar.get_spec(cfg.backbone)
    crop = cfg.crop or spec.window
    sizes = augmented_sizes(cfg)
    samples = cfg.images * cfg.views
    windows_per_image = statistics.fmean(spar.count_windows(h, w, crop, cfg.stride) for h, w in sizes)
    tokens = statistics.fmean((h // spec.patch_size) * (w // spec.patch_size) for h, w in sizes)
    pixels = statistics.fmean(h * w for h, w in sizes)
    bb = spar.load_backbone(cfg.backbone, pretrained=None, device="meta")  # shapes only
    spar.set_trainable(bb, cfg.trainable)
    per_window = window_flops(bb, crop)
    teacher_flops = per_window * windows_per_image * samples
    precision = resolve_compute_dtype(cfg.teacher_amp_dtype, gpu=True, strict_fp32=cfg.strict_fp32)
    peak = cfg.peak_tflops * PEAK_RATIO[precision]
    rate = cfg.teacher_windows_per_s or peak * 1e12 * cfg.mfu / per_window
    teacher_gpu_h = windows_per_image * samples / rate / 3600
    step = mean_student_step_flops(bb, sizes, spec.patch_size)
    train_rate = cfg.train_images_per_s or cfg.peak_tflops * 1e12 * cfg.train_mfu / step
    train_gpu_h = samples * cfg.epochs / train_rate / 3600
    image_bytes = {"raw": pixels * 3 + RAW_HEADER_BYTES, "png": pixels * cfg.png_bytes_per_pixel}
    cache = {}
    for enc, nbytes in BYTES_PER_VALUE.items():
        target = tokens * (spec.dim * nbytes + (4 if enc == "int8" else 0))
        per_sample = target + image_bytes[cfg.image_encoding]
        cache[enc] = {"bytes_per_sample": per_sample, "total_tb": per_sample * samples / 1e12,
                      "train_read_mb_per_s_per_gpu": per_sample * train_rate / 1e6}
    sample_bytes = cache["float16"]["bytes_per_sample"]  # default targets; cost per byte read (+ PNG decoding)
    decode_s = pixels * PNG_S_PER_PIXEL if cfg.image_encoding == "png" else 0.0
    loader_rate = cfg.loader_samples_per_s_per_core or 1 / (sample_bytes * LOADER_S_PER_BYTE + decode_s)
    out = {
        "samples": samples, "mean_image_hw": [round(statistics.fmean(h for h, _ in sizes)),
                                              round(statistics.fmean(w for _, w in sizes))],
        "windows_per_image": windows_per_image, "windows_total": windows_per_image * samples,
        "gflop_per_window": per_window / 1e9, "teacher_pflop": teacher_flops / 1e15,
        "teacher_precision": precision, "teacher_peak_tflops": peak,
        "teacher_windows_per_s_per_gpu": rate, "teacher_gpu_hours": teacher_gpu_h,
        "teacher_wall_hours": teacher_gpu_h / cfg.gpus, "shards": math.ceil(samples / cfg.shard_size),
        "cache": cache, "student_step_tflop": step / 1e12, "train_images_per_s_per_gpu": train_rate,
        "train_gpu_hours": train_gpu_h, "train_wall_hours": train_gpu_h / cfg.gpus,
        "image_encoding": cfg.image_encoding, "loader_samples_per_s_per_core": loader_rate,
        "loader_cores_per_gpu": train_rate / loader_rate,
    }
    return out
