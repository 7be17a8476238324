"""The one place that configures logging, plus a rank-0 helper for distributed prints."""
from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"


def _quiet_root_info(record: logging.LogRecord) -> bool:
    """Drop INFO chatter that libraries (open_clip) send through the bare root logger."""
    return record.name != "root" or record.levelno >= logging.WARNING


def setup_logging(level: str | int | None = None) -> None:
    """Configure the root logger once (level from `level` or ``SPAR_LOG_LEVEL``, default INFO)."""
    level = level or os.environ.get("SPAR_LOG_LEVEL", "INFO")
    root = logging.getLogger()
    if not any(getattr(h, "_spar", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        handler._spar = True
        handler.addFilter(_quiet_root_info)
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("urllib3", "botocore", "s3fs", "aiobotocore", "fsspec", "timm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def rank_zero_info(logger: logging.Logger, msg: str, *args) -> None:
    """Log on global rank 0 only (``RANK`` env, as torch.distributed and Ray Train set it)."""
    if int(os.environ.get("RANK", "0")) == 0:
        logger.info(msg, *args)


def duration(seconds: float) -> str:
    """``1h02m``, ``3m05s``, ``42s``."""
    s = int(max(0, seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Done / total, rate and ETA, logged at most every `every_s` seconds (and when asked to, at the
    end). A total <= 0 is unknown: the line then has no percentage and no ETA."""

    def __init__(self, logger: logging.Logger, what: str, total: int, every_s: float = 30.0):
        import time

        self.log, self.what, self.total, self.every_s = logger, what, total, every_s
        self.t0 = self.last = time.monotonic()

    def update(self, done: int, extra: str = "", force: bool = False) -> str | None:
        """Log a line if `every_s` passed (or `force`); returns it."""
        import time

        now = time.monotonic()
        if not force and (self.every_s <= 0 or now - self.last < self.every_s):
            return None
        self.last = now
        elapsed = now - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.total > 0:
            eta = duration((self.total - done) / rate) if rate > 0 and done < self.total else ("0s" if done >= self.total else "?")
            line = f"{self.what}: {done}/{self.total} ({100 * done / self.total:.1f}%)"
        else:
            eta, line = None, f"{self.what}: {done} (total unknown)"
        line += f", {rate:.3g}/s, elapsed {duration(elapsed)}"
        if extra:
            line += f", {extra}"
        if eta is not None:
            line += f", ETA {eta}"
        self.log.info("%s", line)
        return line
