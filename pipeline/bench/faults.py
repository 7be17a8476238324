"""`benchmark.py faults`: what the storage retry layer costs when nothing fails, and what the cache
job delivers when the object store fails a share of its requests.

Everything runs against a local S3 server (moto) behind the fault-injecting proxy
(`s3proxy.FaultyProxy`), credentials in ``storage_options`` as users give them:

1. overhead, with no faults: the cache job (a fresh output each run) and the training loader (one
   process reading the cache) with the retry layer on and off (``SPAR_STORAGE_RETRY=off``: plain
   client calls), alternated (`repeats` job pairs, `loader_pairs` loader pairs, each pair's order
   swapped from the last); medians, and the median of the loader's per-pair ratios. The job's S3
   requests (counted by the proxy) times the layer's cost per call bound what it adds to a job. A job's time on this
   kind of machine moves by more than the layer can cost, so the layer's own cost is also timed
   per request: `ops` small ranged reads and whole-object reads, on and off in alternating blocks;
2. storms: the cache job at each fault rate of `rates` (all fault kinds): images/s against the
   same job with no faults, the faults injected, and the retries the job reports.
"""
from __future__ import annotations

import os
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from pipeline.config import check


@dataclass(kw_only=True)
class FaultBench:
    """`benchmark.py faults`: retry-layer overhead without faults; cache-job throughput under faults."""

    backbone: str = "maskclip-test"  # a cheap teacher: storage is a large share of the job's time
    images: int = 24  # source images (PNG, `height` x `width`) on the S3 server
    height: int = 480
    width: int = 640
    scale: list[int] = field(default_factory=lambda: [448, 320])  # augmentation scale (long, short)
    min_side: int = 224
    shard_size: int = 4  # samples a shard: more shards, more requests a sample
    rates: list[float] = field(default_factory=lambda: [0.01, 0.1])  # fault rates of the storm runs
    repeats: int = 2  # on/off pairs of the cache-job overhead runs
    loader_pairs: int = 12  # on/off pairs of loader runs (alternating which goes first)
    loader_passes: int = 5  # times the loader reads the cache per measurement
    ops: int = 400  # requests per block of the per-request timing (12 blocks: 6 on, 6 off)
    num_cpus: int = 2
    seed: int = 0
    out: Optional[str] = None

    def __post_init__(self):
        check(self.images >= 2 and self.repeats >= 1 and self.loader_passes >= 1 and self.loader_pairs >= 1,
              "images must be >= 2, repeats, loader_pairs and loader_passes >= 1")
        check(all(0 <= r < 1 for r in self.rates), "rates must be in [0, 1)")


def _retry_layer(on: bool) -> None:
    os.environ["SPAR_STORAGE_RETRY"] = "on" if on else "off"  # read at every call, inherited by Ray's workers


def _cache_job(cfg: FaultBench, options: dict, source: str, output: str) -> tuple[dict, float]:
    from pipeline.cache.augment import AugmentConfig
    from pipeline.cache.job import CacheConfig, run

    job = CacheConfig(source=source, output=output, backbone=cfg.backbone, pretrained=None, num_cpus=cfg.num_cpus,
                      shard_size=cfg.shard_size, storage_options=options,
                      augment=AugmentConfig(scale=list(cfg.scale), min_side=cfg.min_side))
    t = time.perf_counter()
    summary = run(job)
    return summary, time.perf_counter() - t


def _per_request(store, url: str, ops: int) -> dict:
    """Seconds a request (a 4 KB ranged read, a whole small object read) with the layer on and off,
    in blocks ordered on, off, off, on, ... (a drift of the machine's speed cancels); medians."""
    times: dict[str, list[float]] = {"on": [], "off": []}
    for block in range(12):
        mode = "on" if block % 4 in (0, 3) else "off"
        _retry_layer(mode == "on")
        t = time.perf_counter()
        for i in range(ops // 2):
            store.read_range(url, 4096 * (i % 8), 4096 * (i % 8 + 1))
            store.read_bytes(url)
        times[mode].append((time.perf_counter() - t) / ops)
    _retry_layer(True)
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    return {"request_s": {"on": on, "off": off}, "request_blocks_s": times, "per_request_overhead": on / off - 1,
            "wrapper_s": _wrapper_cost(), "wrapper_share_of_a_request": _wrapper_cost() / off}


def _wrapper_cost(n: int = 200_000) -> float:
    """Seconds the retry layer adds to an operation that succeeds: `retry.call` around a no-op,
    less the no-op called directly (best of 5)."""
    from pipeline import retry

    policy, noop = retry.RetryPolicy(), (lambda: None)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            retry.call(policy, "read", "s3://b/k", noop)
        wrapped = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(n):
            noop()
        best = min(best, (wrapped - (time.perf_counter() - t)) / n)
    return best


def bench_faults(cfg: FaultBench) -> dict:
    """The overhead runs, then the storm runs (see the module docstring)."""
    import boto3

    from pipeline.bench.loader import loader_rate
    from pipeline.bench.s3proxy import FaultyProxy, start_moto
    from pipeline.codecs import png_bytes
    from pipeline.samples import synthetic_scene
    from pipeline.storage import Storage

    endpoint, server = start_moto()
    try:
        bucket = f"faults-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        with FaultyProxy(endpoint, faults=0.0, seed=cfg.seed) as proxy:
            options = {"endpoint_url": proxy.endpoint, "key": "bench", "secret": "bench"}
            store, root = Storage(options), f"s3://{bucket}"
            for i in range(cfg.images):
                store.write_bytes(f"{root}/src/{i:04d}.png", png_bytes(synthetic_scene(cfg.height, cfg.width, seed=i)))
            store.write_bytes(f"{root}/probe.bin", bytes(64 << 10))
            requests = _per_request(store, f"{root}/probe.bin", cfg.ops)
            jobs: dict[str, list[float]] = {"on": [], "off": []}
            loads: dict[str, list[float]] = {"on": [], "off": []}
            job_requests = []
            cache = f"{root}/overhead-0-on"
            try:
                for r in range(cfg.repeats):
                    for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
                        _retry_layer(mode == "on")
                        proxy.reset()
                        summary, seconds = _cache_job(cfg, options, f"{root}/src", f"{root}/overhead-{r}-{mode}")
                        check(summary["computed"] == cfg.images, f"the {mode} run cached {summary['computed']} images")
                        jobs[mode].append(seconds)
                        job_requests.append(proxy.requests())
                for r in range(cfg.loader_pairs):  # short runs, paired: a drift of the machine cancels
                    for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
                        _retry_layer(mode == "on")
                        loads[mode].append(loader_rate(cache, passes=cfg.loader_passes, store=store))
            finally:
                _retry_layer(True)
            job_s = {m: statistics.median(v) for m, v in jobs.items()}
            loader = {m: statistics.median(v) for m, v in loads.items()}
            pair_ratios = [off / on - 1 for on, off in zip(loads["on"], loads["off"])]
            storms = []
            for rate in cfg.rates:
                proxy.reset()
                proxy.set_faults(rate, seed=cfg.seed)
                summary, seconds = _cache_job(cfg, options, f"{root}/src", f"{root}/storm-{rate}")
                proxy.set_faults(0.0)
                storms.append({"fault_rate": rate, "job_s": seconds, "images_per_s": cfg.images / seconds,
                               "throughput_vs_no_faults": job_s["on"] / seconds, "faults": proxy.faults(),
                               "computed": summary["computed"], "failed": summary["failed"],
                               "keys_committed_twice": summary["keys_committed_twice"],
                               "storage_retries_by_kind": summary["storage_retries_by_kind"]})
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"mode": "faults", "backbone": cfg.backbone, "images": cfg.images, "image": [cfg.height, cfg.width],
            **requests,
            "cache_job_s": job_s, "cache_job_runs_s": jobs, "cache_job_overhead": job_s["on"] / job_s["off"] - 1,
            # the layer's own cost in a job: every S3 request of it wrapped once, at the wrapper's cost
            "cache_job_requests": statistics.median(job_requests),
            "cache_job_layer_cost_share": statistics.median(job_requests) * requests["wrapper_s"] / job_s["on"],
            "loader_samples_per_s": loader, "loader_runs": loads,
            "loader_overhead": loader["off"] / loader["on"] - 1,
            "loader_overhead_paired": statistics.median(pair_ratios), "loader_pair_ratios": pair_ratios,
            "storms": storms}
