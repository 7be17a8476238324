"""Throughput measurements, every ratio measured side by side in one run (these machines are noisy).

``python jobs/benchmark.py <mode> key=value ...``; one module per mode, beside what it measures:

    teacher  (teacher.py)  windows/s of the sliding-window teacher, share of time outside the ViT,
                           the GEMM ceiling of the same dtype, and model-FLOP utilisation against it
    speedup  (teacher.py)  single pass vs sliding window at one resolution (the paper: ~52x on GPU)
    cache    (cache.py)    the cache job end to end vs the bare teacher; bytes/token per encoding
    train    (train.py)    Ray Train + DeepSpeed vs a plain loop; data-wait share; steps/s (GPU when there is one)
    loader   (loader.py)   loader samples/s per core and bytes per sample at 1024 x 2048, raw vs PNG images
    manifest (manifest.py) opening a finished cache at 100 / 1,000 / 10,000 shards: seconds, S3 requests
    scale    (scale.py)    a cache of millions of samples: seconds and peak memory of opening it, planning an
                           epoch, the validation split, the cache job's rerun state and its listing of the
                           source, each in a fresh process
    commits  (commits.py)  manifest commits: latency, throughput, conflicts at 1 / 4 / 16 writers; after 100K commits
    faults   (faults.py)   the storage retry layer's cost with no faults (cache job, loader); the cache job at 1% / 10% faults
    s3proxy.py             moto's S3 server and a request-counting (and fault-injecting) proxy, each in a process of its own
    common.py              timing, the GEMM ceiling, the one synthetic-cache builder, saving results
"""
from __future__ import annotations

import importlib
from typing import Callable

# mode -> (module, config class, function); a mode's module is imported when it runs, so the
# measuring processes of `scale` import what their step needs and nothing else (no torch)
MODES = {
    "teacher": ("teacher", "TeacherBench", "bench_teacher"),
    "speedup": ("teacher", "SpeedupBench", "bench_speedup"),
    "cache": ("cache", "CacheBench", "bench_cache"),
    "train": ("train", "TrainBench", "bench_train"),
    "loader": ("loader", "LoaderBench", "bench_loader"),
    "manifest": ("manifest", "ManifestBench", "bench_manifest"),
    "scale": ("scale", "ScaleBench", "bench_scale"),
    "commits": ("commits", "CommitBench", "bench_commits"),
    "faults": ("faults", "FaultBench", "bench_faults"),
}


def mode(name: str) -> tuple[type, Callable[..., dict]]:
    """(config class, benchmark function) of mode `name`."""
    module, schema, bench = MODES[name]
    loaded = importlib.import_module(f"pipeline.bench.{module}")
    return getattr(loaded, schema), getattr(loaded, bench)
