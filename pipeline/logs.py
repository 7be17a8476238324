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
