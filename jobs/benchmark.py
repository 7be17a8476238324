"""Measure throughput: `python jobs/benchmark.py <mode> [preset.yaml] [key=value ...]`.

Modes: teacher, speedup (see pipeline/benchmark.py for what each measures and its keys).
"""
from __future__ import annotations

import logging
import sys

from pipeline.benchmark import MODES, report
from pipeline.config import ConfigError, parse_config
from pipeline.logs import setup_logging

log = logging.getLogger("jobs.benchmark")


def main(argv: list[str] | None = None) -> dict:
    """Run one benchmark mode and print its result; returns the result dict."""
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    if not argv or argv[0] not in MODES:
        raise SystemExit(f"usage: benchmark.py {{{'|'.join(MODES)}}} [key=value ...]")
    schema, bench = MODES[argv[0]]
    try:
        cfg = parse_config(schema, argv[1:])
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    result = bench(cfg)
    report(result, cfg.out)
    return result


if __name__ == "__main__":
    main()
