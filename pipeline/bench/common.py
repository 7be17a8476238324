"""What every benchmark shares: timing with the GPU drained, the GEMM ceiling, a synthetic cache,
and saving a result."""
from __future__ import annotations

import json
import time
from typing import Callable

import numpy as np
import torch

from pipeline import storage
from pipeline.storage import Storage
from pipeline.devices import synchronize


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call, GPU work included."""
    synchronize(device)
    t = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t


def gemm_ceiling(device: torch.device, dtype: torch.dtype | None, n: int | None = None) -> float:
    """FLOP/s of a large square matmul in `dtype` on `device` (best of several)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    dt = dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    a @ b  # warm-up
    best = min(timed(lambda: a @ b, device) for _ in range(5 if device.type == "cpu" else 20))
    return 2 * n ** 3 / best


def synthetic_cache(work: str, name: str, *, backbone: str, count: int, sizes: list[tuple[int, int]],
                    noise: float = 0.0, source: str = "src", **cache_keys) -> tuple[str, float]:
    """A cache job run over the first `count` synthetic scenes of ``<work>/<source>`` (written as
    PNGs on first use, sizes cycled, Gaussian pixel noise of std `noise` so PNGs cost about what
    photos cost to decode) into ``<work>/<name>``, with a random-init `backbone`; returns (the cache
    URL, the job's wall seconds). Runs over one source with growing `count` see the same keys, so
    the same views."""
    from pipeline.cache.job import CacheConfig, run
    from pipeline.samples import synthetic_scene
    from pipeline.codecs import png_bytes

    src, out = storage.join(work, source), storage.join(work, name)
    for i in range(count):
        path = storage.join(src, f"{i:04d}.png")
        if not Storage().exists(path):
            img = synthetic_scene(*sizes[i % len(sizes)], seed=i)
            if noise:
                img = np.clip(img + np.random.default_rng(i).normal(0, noise, img.shape), 0, 255).astype(np.uint8)
            Storage().write_bytes(path, png_bytes(img))
    cfg = CacheConfig(source=src, output=out, backbone=backbone, pretrained=None, limit=count, **cache_keys)
    t = time.perf_counter()
    run(cfg)
    return out, time.perf_counter() - t


def save_result(result: dict, out: str | None) -> None:
    """Write a result as JSON to `out` (a path or URL), if given."""
    if out:
        Storage().write_text(out, json.dumps(result, indent=2))
