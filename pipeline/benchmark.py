"""Throughput measurements, every ratio measured side by side in one run (these machines are noisy).

Modes (``python jobs/benchmark.py <mode> key=value ...``):

* ``teacher``  windows/s and images/s of the sliding-window teacher, the share of wall time outside
               the ViT forwards, the machine's GEMM ceiling in the same dtype, and model-FLOP
               utilisation against it.
* ``speedup``  single pass vs sliding window at one resolution (the paper: ~52x on GPU).
* ``train``    the Ray Train + DeepSpeed loop (1 worker) against a plain PyTorch loop on the same
               model and cache; data-wait share; loader samples/s per core.
* ``cache``    the cache job end to end (local Ray) against bare `sliding_window_features` on the
               same images, for a ViT-B/16 and a tiny model; bytes per token and error of each
               target encoding against float32.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import spar
from pipeline import storage
from pipeline.config import check
from pipeline.devices import AMP_DTYPES, device_name, pick_device, synchronize
from spar.teacher import autocast

log = logging.getLogger(__name__)


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
    dtype: str = "float32"  # float32 | bfloat16 | float16 (autocast of the ViT)
    window_batch: int = 64  # windows per ViT forward
    repeats: int = 1  # timed repetitions (median reported)
    device: str = "auto"  # auto | cpu | cuda
    out: Optional[str] = None  # optional JSON result path or URL

    def __post_init__(self):
        check(self.dtype in AMP_DTYPES, f"dtype must be one of {list(AMP_DTYPES)}")
        check(self.repeats >= 1 and self.images >= 1, "repeats and images must be >= 1")


@dataclass(kw_only=True)
class SpeedupBench:
    """`benchmark.py speedup`: single pass vs sliding-window teacher at one resolution."""

    backbone: str = "maskclip"
    pretrained: Optional[str] = None
    height: int = 1024
    width: int = 2048
    stride: int = 24
    dtype: str = "float32"
    window_batch: int = 64
    repeats: int = 1
    device: str = "auto"
    out: Optional[str] = None

    def __post_init__(self):
        check(self.dtype in AMP_DTYPES, f"dtype must be one of {list(AMP_DTYPES)}")


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call, GPU work included."""
    synchronize(device)
    t = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t


def gemm_ceiling(device: torch.device, dtype: torch.dtype | None, n: int | None = None) -> float:
    """FLOP/s of a large square matmul in `dtype` on `device` (best of several)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    dt = dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    a @ b  # warm-up
    best = min(timed(lambda: a @ b, device) for _ in range(5 if device.type == "cpu" else 20))
    return 2 * n ** 3 / best


def bench_teacher(cfg: TeacherBench) -> dict:
    """Measure the teacher and the bare ViT forwards on the same windows, interleaved."""
    device = pick_device(cfg.device)
    amp = AMP_DTYPES[cfg.dtype]
    bb = spar.load_backbone(cfg.backbone, pretrained=cfg.pretrained, device=device)
    crop = cfg.crop or bb.window
    x = torch.randn(cfg.images, 3, cfg.height, cfg.width, device=device)
    windows = cfg.images * spar.count_windows(cfg.height, cfg.width, crop, cfg.stride)
    chunk = torch.randn(min(cfg.window_batch, windows), 3, crop, crop, device=device)
    full, rest = divmod(windows, cfg.window_batch)

    def vit_only():
        with torch.no_grad(), autocast(device, amp):
            for _ in range(full):
                bb.dense(chunk)
            if rest:
                bb.dense(chunk[:rest])

    def teacher():
        spar.sliding_window_features(bb, x, crop, cfg.stride, cfg.window_batch, amp)

    from pipeline.plan import window_flops

    # counted on a shape-only model: some CPU attention kernels are invisible to the counter
    flops_per_window = window_flops(spar.load_backbone(cfg.backbone, pretrained=None, device="meta"), crop)
    with torch.no_grad(), autocast(device, amp):
        bb.dense(chunk)  # warm-up (kernels, allocator)
    ceiling = gemm_ceiling(device, amp)
    t_teacher, t_vit = [], []
    for _ in range(cfg.repeats):
        t_teacher.append(timed(teacher, device))
        t_vit.append(timed(vit_only, device))
    tt, tv = statistics.median(t_teacher), statistics.median(t_vit)
    achieved = flops_per_window * windows / tt
    return {
        "mode": "teacher", "backbone": cfg.backbone, "device": device_name(device), "dtype": cfg.dtype,
        "threads": torch.get_num_threads(), "image": [cfg.height, cfg.width], "images": cfg.images,
        "crop": crop, "stride": cfg.stride, "window_batch": cfg.window_batch, "windows": windows,
        "teacher_s": tt, "vit_only_s": tv, "windows_per_s": windows / tt, "images_per_s": cfg.images / tt,
        "outside_vit_share": max(0.0, (tt - tv) / tt), "gflop_per_window": flops_per_window / 1e9,
        "model_tflops": achieved / 1e12, "gemm_ceiling_tflops": ceiling / 1e12, "mfu": achieved / ceiling,
    }


def bench_speedup(cfg: SpeedupBench) -> dict:
    """Single-pass vs sliding-window wall time on the same image."""
    device = pick_device(cfg.device)
    amp = AMP_DTYPES[cfg.dtype]
    bb = spar.load_backbone(cfg.backbone, pretrained=cfg.pretrained, device=device)
    x = torch.randn(1, 3, cfg.height, cfg.width, device=device)

    def single():
        with torch.no_grad(), autocast(device, amp):
            bb.dense(x)

    def sliding():
        spar.sliding_window_features(bb, x, None, cfg.stride, cfg.window_batch, amp)

    single()  # warm-up
    t_single, t_sliding = [], []
    for _ in range(cfg.repeats):
        t_single.append(timed(single, device))
        t_sliding.append(timed(sliding, device))
    ts, tw = statistics.median(t_single), statistics.median(t_sliding)
    return {
        "mode": "speedup", "backbone": cfg.backbone, "device": device_name(device), "dtype": cfg.dtype,
        "threads": torch.get_num_threads(), "image": [cfg.height, cfg.width], "stride": cfg.stride,
        "windows": spar.count_windows(cfg.height, cfg.width, bb.window, cfg.stride),
        "single_pass_s": ts, "sliding_window_s": tw, "speedup": tw / ts,
    }


def _flat(result: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in result.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def print_result(result: dict) -> None:
    """Print a (nested) result as aligned ``key  value`` lines."""
    flat = _flat(result)
    width = max(map(len, flat))
    for k, v in flat.items():
        shown = f"{v:.4g}" if isinstance(v, float) else v
        print(f"{k:<{width}}  {shown}")


def save_result(result: dict, out: str | None) -> None:
    """Write a result as JSON to `out` (a path or URL), if given."""
    if out:
        storage.write_text(out, json.dumps(result, indent=2))


@dataclass(kw_only=True)
class CacheBench:
    """`benchmark.py cache`: job overhead over the bare teacher, and target encodings."""

    backbone: str = "maskclip"  # the real-size model (random init)
    images: int = 3  # the job runs on `images`, then on 2 x `images` (steady state = the difference)
    scale: list[int] = field(default_factory=lambda: [512, 384])  # augmentation scale for `backbone`
    min_side: int = 256
    tiny_backbone: str = "maskclip-test"
    tiny_images: int = 12  # tiny model at the paper's augmentation scale (also run at 2x)
    stride: int = 24
    encodings: list[str] = field(default_factory=lambda: ["float16", "float32", "int8"])
    workdir: Optional[str] = None  # default: a temporary directory
    out: Optional[str] = None


def _job_vs_bare(backbone: str, n: int, augment, stride: int, work: str) -> tuple[dict, list[torch.Tensor]]:
    """The cache job on the first `n` and on the first `2n` synthetic images (same keys, so the same
    views), then the bare teacher on every stored image. The difference of the two job times is the
    job's steady-state cost of images n..2n-1 (Ray and actor start-up cancel out); the rest is the
    fixed start-up cost."""
    from pipeline.cache import open_cache
    from pipeline.cache_job import CacheConfig, run
    from pipeline.encode import png_bytes
    from pipeline.sources import synthetic_scene

    src = storage.join(work, backbone, "src")
    sizes = [(1500, 2250), (1024, 768), (900, 1600), (1200, 1200)]
    for i in range(2 * n):
        storage.write_bytes(storage.join(src, f"{i:04d}.png"), png_bytes(synthetic_scene(*sizes[i % len(sizes)], i)))
    job_s = {}
    for count in (n, 2 * n):
        out = storage.join(work, backbone, f"cache-{count}")
        cfg = CacheConfig(source=src, output=out, backbone=backbone, pretrained=None, stride=stride,
                          augment=augment, limit=count)
        t = time.perf_counter()
        run(cfg)
        job_s[count] = time.perf_counter() - t
    cache = open_cache(out)
    first = set(open_cache(storage.join(work, backbone, f"cache-{n}")).keys())
    bb = spar.load_backbone(backbone, pretrained=None)
    maps, bare_extra, windows_extra = [], 0.0, 0
    for sample in cache:
        t = time.perf_counter()
        maps.append(spar.sliding_window_features(bb, bb.normalize(torch.from_numpy(sample["image"])), stride=stride)[0])
        if sample["key"] not in first:
            bare_extra += time.perf_counter() - t
            windows_extra += sample["meta"]["windows"]
    steady = job_s[2 * n] - job_s[n]
    return {
        "backbone": backbone, "images": 2 * n, "job_s": job_s[2 * n], "fixed_startup_s": job_s[n] - steady,
        "steady_images": n, "steady_windows": windows_extra, "job_steady_s": steady, "bare_teacher_s": bare_extra,
        "job_windows_per_s": windows_extra / steady, "bare_windows_per_s": windows_extra / bare_extra,
        "job_images_per_s": n / steady, "steady_overhead": steady / bare_extra - 1,
    }, maps


def encoding_costs(maps: list[torch.Tensor], encodings: list[str]) -> dict:
    """Bytes per token and error against float32 of each encoding, over real teacher maps."""
    import numpy as np

    from pipeline.encode import dequantize, npy_bytes, quantize

    out = {}
    for enc in encodings:
        nbytes, tokens, err, ref_norm, cos_min = 0, 0, 0.0, 0.0, 1.0
        for m in maps:
            q = {k: v.numpy() for k, v in quantize(m, enc).items()}
            nbytes += sum(len(npy_bytes(v)) for v in q.values())
            tokens += m.shape[0] * m.shape[1]
            back = torch.from_numpy(dequantize(q["target"], q.get("target_scale")))
            err += float((back - m).square().sum())
            ref_norm += float(m.square().sum())
            cos_min = min(cos_min, float(torch.nn.functional.cosine_similarity(back, m, dim=-1).min()))
        out[enc] = {"bytes_per_token": nbytes / tokens, "rel_l2_error": float(np.sqrt(err / ref_norm)),
                    "min_token_cosine": cos_min}
    return out


def bench_cache(cfg: CacheBench) -> dict:
    """Cache job vs bare teacher for a real-size and a tiny model, plus encoding costs."""
    import tempfile

    from pipeline.augment import AugmentConfig

    with tempfile.TemporaryDirectory(dir=cfg.workdir) as work:
        big, maps = _job_vs_bare(cfg.backbone, cfg.images,
                                 AugmentConfig(scale=cfg.scale, min_side=cfg.min_side), cfg.stride, work)
        tiny, _ = _job_vs_bare(cfg.tiny_backbone, cfg.tiny_images, AugmentConfig(), cfg.stride, work)
    return {"mode": "cache", "device": device_name(torch.device("cpu")), "threads": torch.get_num_threads(),
            "stride": cfg.stride, "real_model": big, "tiny_model": tiny,
            "encodings_dim": int(maps[0].shape[-1]), "encodings": encoding_costs(maps, cfg.encodings)}


@dataclass(kw_only=True)
class TrainBench:
    """`benchmark.py train`: Ray Train + DeepSpeed loop vs a plain PyTorch loop, same model and data."""

    backbone: str = "maskclip"
    images: int = 8  # source images of the benchmark cache
    views: int = 2
    scale: list[int] = field(default_factory=lambda: [448, 448])  # augmentation scale of the cache
    min_side: int = 224
    epochs: int = 2  # over images x views samples
    warmup_steps: int = 4  # excluded from the steady-state rates
    loader_workers: int = 2
    cpus: int = 2  # CPUs for the Ray worker (and torch threads in both loops)
    zero_stages: list[int] = field(default_factory=lambda: [0, 2])  # one Ray loop per DeepSpeed ZeRO stage
    loader_images: int = 4  # 1024 x 2048 samples for the loader's rate at the paper's resolution
    log_every: int = 4  # steps per metrics row of the Ray loop (its rates come from these rows)
    workdir: Optional[str] = None
    out: Optional[str] = None


def _benchmark_cache(cfg: TrainBench, work: str) -> str:
    """A cache for the training benchmark; stride = crop keeps the teacher cheap (targets' values
    do not change the student's speed)."""
    from pipeline.augment import AugmentConfig
    from pipeline.cache_job import CacheConfig, run
    from pipeline.encode import png_bytes
    from pipeline.sources import synthetic_scene

    src, out = storage.join(work, "src"), storage.join(work, "cache")
    for i in range(cfg.images):
        storage.write_bytes(storage.join(src, f"{i:04d}.png"), png_bytes(synthetic_scene(600, 800, i)))
    crop = spar.get_spec(cfg.backbone).window
    run(CacheConfig(source=src, output=out, backbone=cfg.backbone, pretrained=None, stride=crop, views=cfg.views,
                    augment=AugmentConfig(scale=cfg.scale, min_side=cfg.min_side), num_cpus=cfg.cpus))
    return out


def _paper_size_cache(cfg: TrainBench, work: str) -> str:
    """A cache of 1024 x 2048 views (float16 targets, D=512) of noisy scenes, whose PNGs cost about
    what photos cost to decode; stride = crop keeps the teacher cheap."""
    import numpy as np

    from pipeline.augment import AugmentConfig
    from pipeline.cache_job import CacheConfig, run
    from pipeline.encode import png_bytes
    from pipeline.sources import synthetic_scene

    src, out = storage.join(work, "paper-src"), storage.join(work, "paper-cache")
    rng = np.random.default_rng(0)
    for i in range(cfg.loader_images):
        img = synthetic_scene(1024, 2048, i).astype(np.int16) + rng.normal(0, 8, (1024, 2048, 3)).astype(np.int16)
        storage.write_bytes(storage.join(src, f"{i:04d}.png"), png_bytes(np.clip(img, 0, 255).astype(np.uint8)))
    aug = AugmentConfig(scale=[2048, 1024], ratio_range=[1.0, 1.0], keep_prob=1.0)
    run(CacheConfig(source=src, output=out, backbone=cfg.backbone, pretrained=None,
                    stride=spar.get_spec(cfg.backbone).window, augment=aug, num_cpus=cfg.cpus))
    return out


def _plain_loop(cfg: TrainBench, cache_url: str) -> dict:
    """A single-process PyTorch loop: same student, optimizer, loss and loader; no Ray, no DeepSpeed."""
    from pipeline import loader
    from pipeline.cache import open_cache

    torch.set_num_threads(cfg.cpus)
    cache = open_cache(cache_url)
    bb = spar.load_backbone(cfg.backbone, pretrained=None)
    spar.set_trainable(bb)
    bb.drop_text_tower().train()
    opt = torch.optim.AdamW([p for p in bb.parameters() if p.requires_grad], lr=2e-5, weight_decay=1e-4)
    refs = loader.manifest_refs(cache.manifest)
    times, waits, tokens, samples, step = [], [], 0, 0, 0
    for epoch in range(cfg.epochs):
        plan = loader.plan_epoch(refs, seed=0, epoch=epoch, rank=0, world_size=1, workers=cfg.loader_workers,
                                 batch_size=1, shuffle_buffer=8)
        it = iter(loader.make_loader(cache_url, plan, [0] * cfg.loader_workers))
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                break
            t1 = time.perf_counter()
            loss = spar.feature_loss(bb.dense(bb.normalize(batch["image"])), loader.target_to_float(batch, "cpu"))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            t2 = time.perf_counter()
            step += 1
            if step > cfg.warmup_steps:
                times.append(t2 - t0)
                waits.append(t1 - t0)
                samples += 1
                tokens += batch["target"].shape[1] * batch["target"].shape[2]
    total = sum(times)
    return {"steps": len(times), "samples_per_s": samples / total, "tokens_per_s": tokens / total,
            "data_wait_share": sum(waits) / total}


def _ray_loop(cfg: TrainBench, cache_url: str, work: str, zero_stage: int) -> dict:
    """The real training job with one worker; steady-state rates from its metrics.csv."""
    import csv
    import io

    from pipeline.train import DataSettings, ScalingSettings, TrainConfig, run

    t = time.perf_counter()
    name = f"bench-zero{zero_stage}"
    run(TrainConfig(cache=cache_url, output=storage.join(work, "runs"), name=name, epochs=cfg.epochs,
                    log_every=cfg.log_every, precision="fp32", zero_stage=zero_stage, num_cpus=cfg.cpus,
                    scaling=ScalingSettings(num_workers=1, cpus_per_worker=cfg.cpus),
                    data=DataSettings(loader_workers=cfg.loader_workers)))
    wall = time.perf_counter() - t
    rows = list(csv.DictReader(io.StringIO(storage.read_text(storage.join(work, "runs", name, "metrics.csv")))))
    # rows whose window lies past the warm-up; each covers `log_every` steps of one sample (batch 1)
    steady = [r for r in rows if r["kind"] == "step" and int(r["step"]) - cfg.log_every >= cfg.warmup_steps]
    step_s = [cfg.log_every / float(r["samples_per_s"]) for r in steady]
    total = sum(step_s)
    return {"steps": len(steady) * cfg.log_every, "samples_per_s": len(steady) * cfg.log_every / total,
            "tokens_per_s": sum(float(r["tokens_per_s"]) * s for r, s in zip(steady, step_s)) / total,
            "data_wait_share": sum(float(r["data_wait_share"]) * s for r, s in zip(steady, step_s)) / total,
            "job_wall_s": wall}


def _loader_rate(cache_url: str, workers: int) -> float:
    """Decoded samples/s of the loader alone (PNG + npy + checksums) with `workers` processes."""
    from pipeline import loader
    from pipeline.cache import open_cache

    refs = loader.manifest_refs(open_cache(cache_url).manifest)
    plan = loader.plan_epoch(refs, seed=0, epoch=0, rank=0, world_size=1, workers=workers, batch_size=1,
                             shuffle_buffer=8)
    it = iter(loader.make_loader(cache_url, plan, [0] * workers))
    next(it)  # start-up excluded
    t, n = time.perf_counter(), 0
    for _ in it:
        n += 1
    return n / (time.perf_counter() - t)


def bench_train(cfg: TrainBench) -> dict:
    """Plain loop and Ray Train + DeepSpeed loop on the same cache, then the loader alone."""
    import tempfile

    from pipeline.cache import open_cache

    with tempfile.TemporaryDirectory(dir=cfg.workdir) as work:
        cache_url = _benchmark_cache(cfg, work)
        grid = open_cache(cache_url).manifest.to_pylist()[0]
        plain = _plain_loop(cfg, cache_url)
        ray_loops = {f"zero{z}": _ray_loop(cfg, cache_url, work, z) for z in cfg.zero_stages}
        loader_1 = _loader_rate(cache_url, 1)
        loader_paper = _loader_rate(_paper_size_cache(cfg, work), 1)
    return {"mode": "train", "device": device_name(torch.device("cpu")), "backbone": cfg.backbone,
            "example_image": [grid["height"], grid["width"]], "plain": plain, "ray_deepspeed": ray_loops,
            "ray_overhead": {k: plain["samples_per_s"] / v["samples_per_s"] - 1 for k, v in ray_loops.items()},
            "loader_samples_per_s_per_core": loader_1, "loader_samples_per_s_per_core_1024x2048": loader_paper}


MODES = {"teacher": (TeacherBench, bench_teacher), "speedup": (SpeedupBench, bench_speedup),
         "cache": (CacheBench, bench_cache), "train": (TrainBench, bench_train)}
