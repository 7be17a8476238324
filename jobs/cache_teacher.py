"""Cache sliding-window teacher targets: `python jobs/cache_teacher.py [preset.yaml] [key=value ...]`.

With no arguments: the paper's teacher (ViT-B/16 MaskCLIP, stride 24) on the built-in sample
images, a local Ray cluster, output in ./out/cache. Add `backbone=maskclip-test` for an offline,
seconds-long smoke run. Under `ray job submit -- python jobs/cache_teacher.py ...` it attaches to
the cluster. Keys: see `pipeline.cache.job.CacheConfig`.
"""
from __future__ import annotations

from pipeline.cache.reader import CacheError
from pipeline.cache.job import CacheConfig, TooManyFailures, run
from pipeline.cli import run_job


def main(argv: list[str] | None = None) -> dict:
    """Run (or resume) the cache job and print its summary; exits non-zero on bad input."""
    return run_job(CacheConfig, run, argv, expected=(CacheError, TooManyFailures, FileNotFoundError))


if __name__ == "__main__":
    main()
