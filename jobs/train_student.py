"""Train the single-pass student: `python jobs/train_student.py cache=<url> [preset.yaml] [key=value ...]`.

Runs a Ray Train TorchTrainer with DeepSpeed on the cache's committed shards; the student starts
from the cache's teacher. Re-running the same command (same output and name) resumes. Keys: see
`pipeline.train.TrainConfig`; `scaling.num_workers` / `scaling.use_gpu` scale it out.
"""
from __future__ import annotations

import json
import logging
import sys

from pipeline.cache import CacheError
from pipeline.config import ConfigError, parse_config
from pipeline.logs import setup_logging
from pipeline.train import TrainConfig, run

log = logging.getLogger("jobs.train_student")


def main(argv: list[str] | None = None) -> dict:
    """Parse the config, train, print the final metrics; exits non-zero on bad input."""
    setup_logging()
    try:
        cfg = parse_config(TrainConfig, sys.argv[1:] if argv is None else argv)
        metrics = run(cfg)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    except CacheError as e:
        log.error("%s", e)
        raise SystemExit(2) from None
    print(json.dumps(metrics, indent=2, default=str))
    return metrics


if __name__ == "__main__":
    main()
