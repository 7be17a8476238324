"""`benchmark.py train`: the Ray Train + DeepSpeed loop (1 worker, per ZeRO stage) against a plain
PyTorch loop on the same model and cache, on the GPU when there is one (bf16) or the CPU (fp32):
steps/s, the data-wait share, and loader samples/s per core at the cache's size (`benchmark.py
loader` measures the loader at 1024 x 2048 per image encoding)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

import spar
from pipeline import storage
from pipeline.storage import Storage
from pipeline.bench.common import synthetic_cache
from pipeline.bench.loader import loader_rate
from pipeline.cache.augment import AugmentConfig
from pipeline.devices import device_name, pick_device, synchronize
from spar.teacher import autocast


@dataclass(kw_only=True)
class TrainBench:
    """`benchmark.py train`: Ray Train + DeepSpeed loop vs a plain PyTorch loop, same model and data."""

    backbone: str = "maskclip"
    images: int = 8  # source images of the benchmark cache
    views: int = 2
    source_size: list[int] = field(default_factory=lambda: [600, 800])  # synthetic source images (h, w)
    scale: list[int] = field(default_factory=lambda: [448, 448])  # augmentation scale of the cache (paper: [2048, 1024])
    min_side: int = 224
    epochs: int = 2  # over images x views samples
    warmup_steps: int = 4  # excluded from the steady-state rates
    loader_workers: int = 2
    cpus: int = 2  # CPUs for the Ray worker (and torch threads in both loops)
    zero_stages: list[int] = field(default_factory=lambda: [0, 2])  # one Ray loop per DeepSpeed ZeRO stage
    log_every: int = 4  # steps per metrics row of the Ray loop (its rates come from these rows)
    device: str = "auto"  # auto (the GPU if there is one) | cpu | cuda
    workdir: Optional[str] = None
    out: Optional[str] = None


def _plain_loop(cfg: TrainBench, cache_url: str) -> dict:
    """A single-process PyTorch loop: same student, optimizer, loss and loader; no Ray, no DeepSpeed."""
    from pipeline.train import epochs, loader
    from pipeline.cache.reader import open_cache

    torch.set_num_threads(cfg.cpus)
    device = pick_device(cfg.device)
    amp = torch.bfloat16 if device.type == "cuda" else None  # what precision=auto trains in
    cache = open_cache(cache_url)
    bb = spar.load_backbone(cfg.backbone, pretrained=None)
    spar.set_trainable(bb)
    bb.drop_text_tower().train().to(device)
    opt = torch.optim.AdamW([p for p in bb.parameters() if p.requires_grad], lr=2e-5, weight_decay=1e-4)
    table = epochs.SampleTable.from_table(cache.samples)
    times, waits, tokens, samples, step = [], [], 0, 0, 0
    for epoch in range(cfg.epochs):
        plan = epochs.plan_epoch(table, seed=0, epoch=epoch, rank=0, world_size=1, workers=cfg.loader_workers,
                                 batch_size=1, shuffle_buffer=8)
        it = iter(loader.make_loader(cache_url, Storage(), plan))
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                break
            t1 = time.perf_counter()
            with autocast(device, amp):
                pred = bb.dense(bb.normalize(batch["image"].to(device, non_blocking=True)))
            loss = spar.feature_loss(pred, loader.target_to_float(batch, device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            synchronize(device)
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

    from pipeline.train.job import DataSettings, ScalingSettings, TrainConfig, run

    t = time.perf_counter()
    name = f"bench-zero{zero_stage}"
    gpu = pick_device(cfg.device).type == "cuda"
    run(TrainConfig(cache=cache_url, output=storage.join(work, "runs"), name=name, epochs=cfg.epochs,
                    log_every=cfg.log_every, precision="auto" if gpu else "fp32", zero_stage=zero_stage,
                    num_cpus=cfg.cpus, val_fraction=0.0,
                    scaling=ScalingSettings(num_workers=1, cpus_per_worker=cfg.cpus, use_gpu=gpu),
                    data=DataSettings(loader_workers=cfg.loader_workers)))
    wall = time.perf_counter() - t
    rows = list(csv.DictReader(io.StringIO(Storage().read_text(storage.join(work, "runs", name, "metrics.csv")))))
    # rows whose window lies past the warm-up; each covers `log_every` steps of one sample (batch 1)
    steady = [r for r in rows if r["kind"] == "step" and int(r["step"]) - cfg.log_every >= cfg.warmup_steps]
    step_s = [cfg.log_every / float(r["samples_per_s"]) for r in steady]
    total = sum(step_s)
    return {"steps": len(steady) * cfg.log_every, "samples_per_s": len(steady) * cfg.log_every / total,
            "tokens_per_s": sum(float(r["tokens_per_s"]) * s for r, s in zip(steady, step_s)) / total,
            "data_wait_share": sum(float(r["data_wait_share"]) * s for r, s in zip(steady, step_s)) / total,
            "job_wall_s": wall}


def bench_train(cfg: TrainBench) -> dict:
    """Plain loop and Ray Train + DeepSpeed loop on the same cache, then the loader alone."""
    import tempfile

    from pipeline.cache.reader import open_cache

    with tempfile.TemporaryDirectory(dir=cfg.workdir) as work:
        crop = spar.get_spec(cfg.backbone).window  # stride = crop keeps the teacher cheap; speed needs no real targets
        cache_url, _ = synthetic_cache(work, "cache", backbone=cfg.backbone, count=cfg.images, sizes=[tuple(cfg.source_size)],
                                       stride=crop, views=cfg.views, num_cpus=cfg.cpus,
                                       augment=AugmentConfig(scale=cfg.scale, min_side=cfg.min_side))
        grid = open_cache(cache_url).manifest.to_pylist()[0]
        plain = _plain_loop(cfg, cache_url)
        ray_loops = {f"zero{z}": _ray_loop(cfg, cache_url, work, z) for z in cfg.zero_stages}
        loader_1 = loader_rate(cache_url, passes=2)
    device = pick_device(cfg.device)
    return {"mode": "train", "device": device_name(device), "backbone": cfg.backbone,
            "precision": "bf16" if device.type == "cuda" else "fp32",
            "example_image": [grid["height"], grid["width"]], "plain": plain, "ray_deepspeed": ray_loops,
            "ray_overhead": {k: plain["samples_per_s"] / v["samples_per_s"] - 1 for k, v in ray_loops.items()},
            "loader_samples_per_s_per_core": loader_1}
