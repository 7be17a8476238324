"""What every `jobs/*.py` does around its one pipeline call: logging, config, errors, summary."""
from __future__ import annotations

import json
import logging
import sys
from typing import Any, Callable, Sequence, TypeVar

from pipeline.config import ConfigError, parse_config
from pipeline.logs import setup_logging

T = TypeVar("T")
log = logging.getLogger("jobs")


def print_json(result: Any) -> None:
    """The default way a job shows its result."""
    print(json.dumps(result, indent=2, default=str))


def run_job(schema: type[T], fn: Callable[[T], Any], argv: Sequence[str] | None,
            expected: tuple[type[BaseException], ...] = (), level: str | None = None,
            show: Callable[[Any], None] = print_json) -> Any:
    """Parse `argv` (default: the command line) into `schema`, call `fn(cfg)`, show and return its result.

    A bad config exits with its message; an `expected` error (bad input the user can fix) is logged
    and exits with status 2; anything else is a bug and raises with its traceback.
    """
    setup_logging(level)
    try:
        cfg = parse_config(schema, sys.argv[1:] if argv is None else argv)
        result = fn(cfg)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    except expected as e:
        log.error("%s", e)
        raise SystemExit(2) from None
    show(result)
    return result


def _flat(result: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in result.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def print_result(result: dict) -> None:
    """Print a (nested) result as aligned ``key  value`` lines (the plan and benchmark jobs)."""
    flat = _flat(result)
    width = max(map(len, flat))
    for k, v in flat.items():
        shown = f"{v:.4g}" if isinstance(v, float) else v
        print(f"{k:<{width}}  {shown}")
