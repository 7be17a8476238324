"""Measure throughput: `python jobs/benchmark.py <mode> [preset.yaml] [key=value ...]`.

Modes: teacher, speedup, cache, train, loader, manifest, scale, commits, faults (see `pipeline/bench/`: one
module per mode, with its keys).
"""
from __future__ import annotations

import sys

from pipeline.bench import MODES, mode
from pipeline.bench.common import save_result
from pipeline.cli import print_result, run_job


def main(argv: list[str] | None = None) -> dict:
    """Run one benchmark mode, print its result (and save it to `out=` if given); returns it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in MODES:
        raise SystemExit(f"usage: benchmark.py {{{'|'.join(MODES)}}} [key=value ...]")
    schema, bench = mode(argv[0])

    def measure(cfg):
        result = bench(cfg)
        save_result(result, cfg.out)
        return result

    return run_job(schema, measure, argv[1:], show=print_result)


if __name__ == "__main__":
    main()
