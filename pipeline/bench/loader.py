"""`benchmark.py loader`: what one loader core delivers at the paper's resolution, per image encoding.

Caches of the same synthetic photo-like images (1024 x 2048 by default, Gaussian pixel noise so
PNGs cost what photos cost to decode) are made once per image encoding with float16 targets of
the real model's width (D = 512 for `maskclip`). One loader process then reads each cache for a few
epochs; samples/s of that process is the rate per loader core. Checksums are verified as in
training, and once more without them (raw) to price the verification.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

import spar
from pipeline.bench.common import synthetic_cache
from pipeline.cache.augment import AugmentConfig
from pipeline.cache.encode import IMAGE_ENCODINGS, IMAGE_MEMBERS
from pipeline.config import check
from pipeline.storage import Storage


@dataclass(kw_only=True)
class LoaderBench:
    """`benchmark.py loader`: loader samples/s per core and bytes per sample, per image encoding."""

    backbone: str = "maskclip"  # sets D (512) and the window; its weights do not matter (random init)
    height: int = 1024
    width: int = 2048
    images: int = 4  # samples per cache
    passes: int = 10  # times each cache is read in one loader (the first sample is start-up, excluded)
    encodings: list[str] = field(default_factory=lambda: list(IMAGE_ENCODINGS))
    noise: float = 8.0  # pixel noise std: PNG decode and size close to photos'
    cpus: int = 2  # Ray CPUs for the cache job that builds the caches
    workdir: Optional[str] = None
    out: Optional[str] = None

    def __post_init__(self):
        check(all(e in IMAGE_ENCODINGS for e in self.encodings), f"encodings must be among {IMAGE_ENCODINGS}")
        check(self.images >= 2 and self.passes >= 1, "images must be >= 2 and passes >= 1")


def loader_rate(cache_url: str, *, workers: int = 1, passes: int = 1, verify: bool = True,
                store: Storage | None = None) -> float:
    """Decoded samples/s the training loader delivers with `workers` processes (batch 1) reading
    the cache `passes` times over (through `store`), all in one DataLoader (as in an epoch of a
    large cache); the first sample (process start-up) is excluded."""
    from pipeline.cache.reader import open_cache
    import numpy as np
    import pyarrow as pa

    from pipeline.train import epochs, loader

    store = store or Storage()
    table = epochs.SampleTable.from_table(open_cache(cache_url, store).samples)
    plan = epochs.plan_epoch(table, seed=0, epoch=0, rank=0, world_size=1, workers=workers, batch_size=1,
                             shuffle_buffer=8)
    repeated = epochs.EpochPlan([epochs.WorkerPlan(pa.concat_arrays([w.keys] * passes), np.arange(len(w) * passes + 1),
                                                   w.shards * passes) for w in plan.workers],
                                plan.steps * passes, plan.step_samples * passes)
    n, t = -1, 0.0
    for _ in loader.make_loader(cache_url, store, repeated, verify=verify):
        n += 1
        if n == 0:
            t = time.perf_counter()
    return n / (time.perf_counter() - t)


def _bytes_per_sample(cache_url: str) -> dict:
    from pipeline.cache.reader import iter_raw_shard, open_cache, shard_url

    cache = open_cache(cache_url)
    members: dict[str, list[int]] = {}
    for name in cache.shards.column("shard").to_pylist():
        for raw in iter_raw_shard(shard_url(cache_url, name), Storage()):
            for ext, data in raw.items():
                if not ext.startswith("__"):
                    members.setdefault(ext, []).append(len(data))
    total = sum(cache.shards.column("bytes").to_pylist())
    return {"shard_bytes_per_sample": total / len(cache),
            "member_bytes_per_sample": {k: float(np.mean(v)) for k, v in sorted(members.items())}}


def bench_loader(cfg: LoaderBench) -> dict:
    """One cache per image encoding, then one loader process reading each (see the module docstring)."""
    crop = spar.get_spec(cfg.backbone).window
    long, short = max(cfg.height, cfg.width), min(cfg.height, cfg.width)
    augment = AugmentConfig(scale=[long, short], ratio_range=[1.0, 1.0], keep_prob=1.0, min_side=min(short, 512))
    out = {"mode": "loader", "backbone": cfg.backbone, "image": [cfg.height, cfg.width], "target_dtype": "float16",
           "dim": spar.get_spec(cfg.backbone).dim, "samples": cfg.images, "passes": cfg.passes, "encodings": {}}
    with tempfile.TemporaryDirectory(dir=cfg.workdir) as work:
        for enc in cfg.encodings:  # stride = crop keeps the teacher cheap; the loader needs no real targets
            url, _ = synthetic_cache(work, f"cache-{enc}", backbone=cfg.backbone, count=cfg.images,
                                     sizes=[(cfg.height, cfg.width)], noise=cfg.noise, stride=crop,
                                     num_cpus=cfg.cpus, image_encoding=enc, augment=augment)
            sizes = _bytes_per_sample(url)
            out["encodings"][enc] = {"image_member": IMAGE_MEMBERS[enc], **sizes, "url": url}
        for enc in cfg.encodings:  # rates measured back to back, after every cache is built
            r = out["encodings"][enc]
            r["samples_per_s_per_core"] = loader_rate(r["url"], passes=cfg.passes)
            r["mb_per_s_per_core"] = r["samples_per_s_per_core"] * r["shard_bytes_per_sample"] / 1e6
            if enc == "raw":
                unverified = loader_rate(r["url"], passes=cfg.passes, verify=False)
                r["samples_per_s_per_core_unverified"] = unverified
                r["checksum_cost_share"] = 1 - r["samples_per_s_per_core"] / unverified
            del r["url"]
    rates = {e: r["samples_per_s_per_core"] for e, r in out["encodings"].items()}
    if {"raw", "png"} <= set(rates):
        out["raw_over_png_samples_per_s"] = rates["raw"] / rates["png"]
        out["raw_over_png_bytes"] = (out["encodings"]["raw"]["shard_bytes_per_sample"]
                                     / out["encodings"]["png"]["shard_bytes_per_sample"])
    return out
