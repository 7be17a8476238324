"""`benchmark.py scale`: what a large cache costs its readers before any image is read: opening it,
planning an epoch (of the cache alone, and of the same samples as a mixture of `mixtures` caches,
drawn at unequal weights), splitting off validation, and the cache job's rerun bookkeeping
(`_resume_state`).

The cache is synthetic but real in every other way: `samples` rows of the manifest's schema, with keys,
shard names, tar paths and checksums shaped as the cache job writes them, appended to a Delta table
`rows_per_commit` rows at a time and finished as every job ends (its tars are not written: nothing
measured here reads them). It lives in a temporary directory, or on moto's S3 server (`storage=s3`).

Each step runs in a fresh Python process, so no step's allocations or caches (pyarrow's memory pool,
the Delta log) count towards another's. In it, everything is imported and the step's inputs are
prepared first; then the kernel's high-water mark of resident memory (VmHWM) is reset to the current
RSS, the step runs, and its peak is VmHWM minus that RSS. `ru_maxrss` would not do: on Linux a child
inherits its parent's peak across exec, so a child of the process that built the cache reads as large.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import deltalake  # noqa: F401  (imported before any measurement: the first read would pay for these)
import numpy as np
import pandas  # noqa: F401  (pyarrow imports it on first use; Ray Train and Ray Data, in every job's process, do too)
import pyarrow as pa
import pyarrow.parquet  # noqa: F401

from pipeline import storage
from pipeline.bench.s3proxy import start_moto
from pipeline.cache import shards
from pipeline.cache.reader import FORMAT, open_cache
from pipeline.cache.sources import make_key
from pipeline.config import check
from pipeline.storage import Storage
from pipeline.train import validation

STEPS = ["open", "plan", "val_split", "resume_plan", "list"]


@dataclass(kw_only=True)
class ScaleBench:
    """`benchmark.py scale`: seconds and peak memory of a cache's readers at `samples` rows."""

    samples: int = 1_000_000
    world_size: int = 1024  # ranks the epoch is planned for (rank 0's plan is made)
    samples_per_shard: int = 32  # the cache job's default shard_size
    storage: str = "local"  # local (a temporary directory) or s3 (moto's server, needs moto[server])
    sizes: list[list[int]] = field(default_factory=lambda: [[1024, 2048], [768, 1536], [1500, 2250]])  # cycled
    val_fraction: float = 0.02
    val_max_images: int = 1000  # the training job's default cap
    batch_size: int = 8
    loader_workers: int = 4
    shuffle_buffer: int = 8
    rows_per_commit: int = 200_000
    mixtures: list[int] = field(default_factory=lambda: [2, 10])  # the samples as a mixture of this many caches
    out: str | None = None

    def __post_init__(self):
        check(self.storage in ("local", "s3"), "storage must be local or s3")
        check(self.samples >= 1 and self.samples_per_shard >= 1 and self.rows_per_commit >= 1,
              "samples, samples_per_shard and rows_per_commit must be >= 1")
        check(len(self.sizes) >= 1 and all(len(s) == 2 for s in self.sizes), "sizes must be [[height, width], ...]")
        check(all(2 <= k <= self.samples for k in self.mixtures), "mixtures: caches per mixture, each in [2, samples]")


def _hex(count: int, chars: int, rng: np.random.Generator) -> list[str]:
    """`count` random strings of `chars` hex digits."""
    digits = rng.bytes(count * chars // 2).hex()
    return [digits[k:k + chars] for k in range(0, len(digits), chars)]


def _manifest(cfg: ScaleBench) -> pa.Table:
    """The rows a cache job over `cfg.samples` images would commit, built column by column."""
    n, rng = cfg.samples, np.random.default_rng(0)
    sources = [f"s3://bucket/sa1b/sa_{i}.jpg" for i in range(n)]
    keys = [f"sa_{i}_{hashlib.sha1(s.encode()).hexdigest()[:12]}_v0" for i, s in enumerate(sources)]
    assert keys[-1] == make_key(sources[-1]) + "_v0", "keys no longer match the cache job's"
    shard = np.arange(n) // cfg.samples_per_shard
    sha = _hex(int(shard[-1]) + 1, 64, rng)  # a shard is named by the first 32 hex of its tar's sha256
    of_shard = pa.array(shard)
    size = np.array(cfg.sizes, np.int64)[np.arange(n) % len(cfg.sizes)]
    grid = size // 16
    target_bytes = grid[:, 0] * grid[:, 1] * 1024 + 128  # D = 512 in float16, plus the .npy header
    sample_bytes = size[:, 0] * size[:, 1] * 3 + target_bytes + 1024  # raw image, target, json, tar headers
    return pa.table({
        "key": keys, "source": sources, "view": np.zeros(n, np.int32),
        "shard": pa.array([s[:32] for s in sha]).take(of_shard),
        "tar": pa.array([f"shards/{s[:32]}.tar" for s in sha]).take(of_shard),
        "height": size[:, 0], "width": size[:, 1], "grid_h": grid[:, 0], "grid_w": grid[:, 1],
        "target_bytes": target_bytes,
        "image_checksum": [f"crc32:{c}" for c in _hex(n, 8, rng)],
        "target_checksum": [f"crc32:{c}" for c in _hex(n, 8, rng)],
        "windows": grid[:, 0] * grid[:, 1] * 2695 // (64 * 128),  # 2695 windows at 1024 x 2048
        "shard_samples": np.bincount(shard)[shard],
        "shard_bytes": np.bincount(shard, sample_bytes).astype(np.int64)[shard],
        "shard_sha256": pa.array(sha).take(of_shard), "run": pa.repeat("20250101-000000-bench0", n),
        "committed": time.time() + shard * 0.5,  # one shard committed every half second
    }, schema=shards.SAMPLE_SCHEMA)


def _build(store: Storage, url: str, cfg: ScaleBench) -> float:
    """Write the synthetic cache (fingerprint, manifest, finish); returns its seconds."""
    t = time.perf_counter()
    table = _manifest(cfg)
    shards.write_json(store, storage.join(url, "teacher.json"), {"format": FORMAT})
    shards.create_tables(store, url)
    for lo in range(0, table.num_rows, cfg.rows_per_commit):
        shards._append(store, url, shards.MANIFEST, table.slice(lo, cfg.rows_per_commit))
    shards.finish(store, url)
    return time.perf_counter() - t


def _resume_state(store: Storage, url: str) -> shards.Committed:
    """What the cache job computes on a rerun before it dispatches work: the keys already committed."""
    return shards.committed_keys(store, url)


def _kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field_name + ":"))


def _measured(fn: Callable[[], dict]) -> tuple[dict, float, float]:
    """(`fn()`, its seconds, its peak resident memory above what was resident before it, in GB)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS: what imports and set-up peaked at is not counted
    before = _kb("VmRSS")
    t = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t
    return result, seconds, (_kb("VmHWM") - before) * 1024 / 1e9


def _step(step: str, url: str, options: dict, cfg: ScaleBench) -> dict:
    """One step, measured (in the child process); its set-up (opening the cache) is not."""
    if step == "open":
        out, seconds, peak = _measured(lambda: {"opened_samples": len(open_cache(url, options))})
        return {"open_s": seconds, "open_peak_gb": peak, **out}
    if step == "resume_plan":
        out, seconds, peak = _measured(lambda: {
            "resume_state_bytes": len(pickle.dumps(_resume_state(Storage(options), url), protocol=5))})  # what the driver holds
        return {"resume_plan_s": seconds, "resume_peak_gb": peak, **out}
    if step == "list":
        return _list_step(cfg)
    cache = open_cache(url, options)
    if step == "val_split":
        out, seconds, peak = _measured(lambda: {
            "val_held_out": validation.split_manifest(cache.samples, cfg.val_fraction, cfg.val_max_images)[1].num_rows})
        return {"val_split_s": seconds, "val_split_peak_gb": peak, **out}
    from pipeline.train import epochs

    def plan() -> dict:  # what every rank does: the table once per run, the plan once per epoch
        table = epochs.SampleTable.from_table(cache.samples)
        return {"plan_steps": epochs.plan_epoch(
            table, seed=0, epoch=0, rank=0, world_size=cfg.world_size, workers=cfg.loader_workers,
            batch_size=cfg.batch_size, shuffle_buffer=cfg.shuffle_buffer).steps}
    if step == "plan":
        out, seconds, peak = _measured(plan)
        return {"plan_s": seconds, "plan_peak_gb": peak, **out}
    k = int(step[len("plan_mix"):])
    bounds = np.linspace(0, cache.samples.num_rows, k + 1).astype(int)
    parts = [cache.samples.slice(lo, hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:])]  # k caches' rows

    def plan_mixture() -> dict:  # weights 1..k: the first caches subsampled, the last repeated
        tables = [epochs.SampleTable.from_table(rows) for rows in parts]
        draw = epochs.draw_counts([len(t) for t in tables], list(range(1, k + 1)))
        table = epochs.SampleTable.concat(tables).with_draw(draw)
        return {f"plan_mix{k}_steps": epochs.plan_epoch(
            table, seed=0, epoch=0, rank=0, world_size=cfg.world_size, workers=cfg.loader_workers,
            batch_size=cfg.batch_size, shuffle_buffer=cfg.shuffle_buffer).steps}
    out, seconds, peak = _measured(plan_mixture)
    return {f"plan_mix{k}_s": seconds, f"plan_mix{k}_peak_gb": peak, **out}


def _list_step(cfg: ScaleBench) -> dict:
    """The cache job's driver on a first run over a folder of `cfg.samples` images: listing it and
    turning it into work items (`job.work_items`). The storage's pages are synthetic (SA-1B's
    names, 1,000 a page in S3's lexicographic order, made as they are consumed): what is measured
    is what the driver keeps of a listing, not the object store's latency."""
    from pipeline.cache import job

    names = sorted(f"sa_{i}.jpg" for i in range(cfg.samples))  # outside the measurement: S3's order

    def pages(self, url, suffixes=None, page=1000):
        for lo in range(0, len(names), page):
            yield [f"{url.rstrip('/')}/{n}" for n in names[lo:lo + page]]

    with tempfile.TemporaryDirectory() as work:
        Storage.iter_files = pages
        run = job.CacheConfig(source=work, output=os.path.join(work, "cache"), pretrained=None)
        empty = shards.committed_keys(Storage(), run.output)
        (items, listed), seconds, peak = _measured(lambda: job.work_items(run, Storage(), empty))
        return {"list_s": seconds, "list_peak_gb": peak, "listed": listed, "list_items_bytes": items.images.nbytes}


def _child() -> None:
    """A measuring process: argv is (step, url, options JSON, config JSON); prints its result as JSON."""
    step, url, options, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    print(json.dumps(_step(step, url, options, ScaleBench(**cfg))))


def _run_step(step: str, url: str, options: dict, cfg: ScaleBench) -> dict:
    """One step in a fresh process; a step that fails reports its error instead of stopping the rest."""
    code = "from pipeline.bench.scale import _child; _child()"
    done = subprocess.run([sys.executable, "-c", code, step, url, json.dumps(options),
                           json.dumps(asdict(cfg))], capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        return {f"{step}_error": lines[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def _location(cfg: ScaleBench) -> Iterator[tuple[str, dict]]:
    """(cache URL, storage options) on local disk or on a fresh moto S3 server, removed afterwards."""
    if cfg.storage == "local":
        with tempfile.TemporaryDirectory() as work:
            yield os.path.join(work, "cache"), {}
        return
    import boto3

    endpoint, server = start_moto()
    try:
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                     region_name="us-east-1").create_bucket(Bucket="scale-bench")
        yield "s3://scale-bench/cache", {"endpoint_url": endpoint, "key": "bench", "secret": "bench"}
    finally:
        server.terminate()


def bench_scale(cfg: ScaleBench) -> dict:
    """Build a cache of `cfg.samples` rows, then measure every step on it in a process of its own."""
    result = {"mode": "scale", "samples": cfg.samples, "world_size": cfg.world_size, "storage": cfg.storage}
    with _location(cfg) as (url, options):
        result["build_s"] = _build(Storage(options), url, cfg)
        for step in STEPS + [f"plan_mix{k}" for k in cfg.mixtures]:
            result.update(_run_step(step, url, options, cfg))
    for step in ("open", "plan", *(f"plan_mix{k}" for k in cfg.mixtures)):
        if f"{step}_peak_gb" in result:
            result[f"{step}_bytes_per_sample"] = result[f"{step}_peak_gb"] * 1e9 / cfg.samples
    return result
