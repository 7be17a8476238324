"""Estimate a run before paying for it: `python jobs/plan.py [preset.yaml] [key=value ...]`.

Prints windows, teacher FLOPs and GPU-hours, cache bytes per encoding, shard count and training
time (see `pipeline.plan.PlanConfig` for the keys, e.g. images=25000 gpus=8 stride=24).
"""
from __future__ import annotations

from pipeline.cli import print_result, run_job
from pipeline.plan import PlanConfig, plan


def main(argv: list[str] | None = None) -> dict:
    """Print the estimate as aligned lines and return it."""
    return run_job(PlanConfig, plan, argv, level="WARNING", show=print_result)


if __name__ == "__main__":
    main()
