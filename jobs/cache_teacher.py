"""Cache sliding-window teacher targets: `python jobs/cache_teacher.py [preset.yaml] [key=value ...]`.

With no arguments: the paper's teacher (ViT-B/16 MaskCLIP, stride 24) on the built-in sample
images, a local Ray cluster, output in ./out/cache. Add `backbone=maskclip-test` for an offline,
seconds-long smoke run. Under `ray job submit -- python jobs/cache_teacher.py ...` it attaches to
the cluster. Keys: see `pipeline.cache_job.CacheConfig`.
"""
from __future__ import annotations

import json
import logging
import sys

from pipeline.cache import CacheError
from pipeline.cache_job import CacheConfig, TooManyFailures, run
from pipeline.config import ConfigError, parse_config
from pipeline.logs import setup_logging

log = logging.getLogger("jobs.cache_teacher")


def main(argv: list[str] | None = None) -> dict:
    """Parse the config, run the cache job, print its summary; exits non-zero on failure."""
    setup_logging()
    try:
        cfg = parse_config(CacheConfig, sys.argv[1:] if argv is None else argv)
        summary = run(cfg)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    except (CacheError, TooManyFailures, FileNotFoundError) as e:
        log.error("%s", e)
        raise SystemExit(2) from None
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
