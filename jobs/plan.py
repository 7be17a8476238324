"""Estimate a run before paying for it: `python jobs/plan.py [preset.yaml] [key=value ...]`.

Prints windows, teacher FLOPs and GPU-hours, cache bytes per encoding, shard count and training
time (see `pipeline.plan.PlanConfig` for the keys, e.g. images=25000 gpus=8 stride=24).
"""
from __future__ import annotations

import logging
import sys

from pipeline.benchmark import report
from pipeline.config import ConfigError, parse_config
from pipeline.logs import setup_logging
from pipeline.plan import PlanConfig, plan

log = logging.getLogger("jobs.plan")


def main(argv: list[str] | None = None) -> dict:
    """Parse the config, print the estimate, return it."""
    setup_logging("WARNING")
    try:
        cfg = parse_config(PlanConfig, sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    result = plan(cfg)
    report(result, None)
    return result


if __name__ == "__main__":
    main()
