"""`benchmark.py manifest`: what opening a finished cache costs as it grows, on local disk and on
moto's S3 server: wall seconds and (on S3) storage requests, counted by a proxy in front of it.

Each cache holds `samples_per_shard` manifest rows per shard, appended `shards_per_commit` shards
at a time (its tars are not written: opening reads the manifest only), then finished the way
every cache job ends (compaction, Delta checkpoint). Readers of a finished table read its
checkpoint and compacted files, not its commit history, so the batching does not change what an
open costs; it keeps building 10,000 shards to minutes.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline import storage
from pipeline.bench.s3proxy import CountingProxy, start_moto
from pipeline.cache import shards
from pipeline.cache.reader import FORMAT, open_cache
from pipeline.storage import Storage


@dataclass(kw_only=True)
class ManifestBench:
    """`benchmark.py manifest`: open time and requests of a finished cache at several sizes."""

    shards: list[int] = field(default_factory=lambda: [100, 1000, 10000])
    samples_per_shard: int = 32  # the cache job's default shard_size
    shards_per_commit: int = 100
    repeats: int = 3  # opens per size (median reported)
    s3: bool = True  # also on moto's S3 server (needs the test extra: moto[server])
    out: str | None = None


def _rows(first_shard: int, count: int, per_shard: int) -> pa.Table:
    rows = []
    for s in range(first_shard, first_shard + count):
        name = f"{s:032x}"
        for i in range(per_shard):
            rows.append({"key": f"img{s}_{i}_v0", "source": f"s3://bucket/src/img{s}_{i}.jpg", "view": 0,
                         "shard": name, "tar": f"shards/{name}.tar", "height": 1024, "width": 2048, "grid_h": 64,
                         "grid_w": 128, "target_bytes": 8388736, "image_checksum": "crc32:00000000",
                         "target_checksum": "crc32:00000000", "windows": 2695, "shard_samples": per_shard,
                         "shard_bytes": 400 << 20, "shard_sha256": "0" * 64, "run": "bench",
                         "committed": time.time()})
    return pa.Table.from_pylist(rows, schema=shards.SAMPLE_SCHEMA)


def _build(store: Storage, out: str, cfg: ManifestBench, n: int) -> float:
    t = time.perf_counter()
    shards.write_json(store, storage.join(out, "teacher.json"), {"format": FORMAT})
    shards.create_tables(store, out)
    for first in range(0, n, cfg.shards_per_commit):
        count = min(cfg.shards_per_commit, n - first)
        shards._append(store, out, shards.MANIFEST, _rows(first, count, cfg.samples_per_shard))
    shards.finish(store, out)
    return time.perf_counter() - t


def _open(store: Storage, out: str, cfg: ManifestBench, proxy: CountingProxy | None) -> dict:
    seconds, requests = [], []
    for _ in range(cfg.repeats):
        if proxy:
            proxy.reset()
        t = time.perf_counter()
        cache = open_cache(out, store)
        seconds.append(time.perf_counter() - t)
        if proxy:
            requests.append(proxy.requests())
    assert len(cache) == cache.samples.num_rows
    result = {"open_s": statistics.median(seconds), "samples": len(cache), "version": cache.version}
    if proxy:
        result["requests"] = statistics.median(requests)
    return result


def bench_manifest(cfg: ManifestBench) -> dict:
    """Build and open caches of every size, locally and on moto's S3 server."""
    results = {"mode": "manifest", "samples_per_shard": cfg.samples_per_shard, "local": {}, "s3": {}}
    with tempfile.TemporaryDirectory() as work:
        for n in cfg.shards:
            out = storage.join(work, f"cache-{n}")
            built = _build(Storage(), out, cfg, n)
            results["local"][str(n)] = dict(_open(Storage(), out, cfg, None), build_s=built)
    if not cfg.s3:
        return results
    import boto3

    endpoint, server = start_moto()
    try:
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                     region_name="us-east-1").create_bucket(Bucket="manifest-bench")
        with CountingProxy(endpoint) as proxy:
            store = Storage({"endpoint_url": proxy.endpoint, "key": "bench", "secret": "bench"})
            for n in cfg.shards:
                out = f"s3://manifest-bench/cache-{n}"
                built = _build(store, out, cfg, n)
                results["s3"][str(n)] = dict(_open(store, out, cfg, proxy), build_s=built)
    finally:
        server.terminate()
    return results
