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
    s3proxy.py             moto's S3 server and a request-counting proxy, each in a process of its own
    common.py              timing, the GEMM ceiling, the one synthetic-cache builder, saving results
"""
from __future__ import annotations

from pipeline.bench.cache import CacheBench, bench_cache
from pipeline.bench.commits import CommitBench, bench_commits
from pipeline.bench.loader import LoaderBench, bench_loader
from pipeline.bench.manifest import ManifestBench, bench_manifest
from pipeline.bench.scale import ScaleBench, bench_scale
from pipeline.bench.teacher import SpeedupBench, TeacherBench, bench_speedup, bench_teacher
from pipeline.bench.train import TrainBench, bench_train

MODES = {"teacher": (TeacherBench, bench_teacher), "speedup": (SpeedupBench, bench_speedup),
         "cache": (CacheBench, bench_cache), "train": (TrainBench, bench_train),
         "loader": (LoaderBench, bench_loader), "manifest": (ManifestBench, bench_manifest),
         "scale": (ScaleBench, bench_scale), "commits": (CommitBench, bench_commits)}
