"""Validation: is the student getting closer to the teacher on images it does not train on?

The held-out set is either a fraction of the cache, chosen by a stable hash of each sample's source
image (all views of an image fall on the same side, so no augmented twin of a validation image is
trained on), or a second cache (`val_cache`). The split is a pure function of the keys: the same on
every rank, restart and rerun. Each rank scores its share of the held-out samples (every
`world`-th, by key) and the sums are added over ranks:

    val MSE          the student's feature MSE against the cached teacher targets
    baseline MSE     the same for the untrained single pass (the student's starting weights), once
    ratio            val MSE / baseline MSE: the distillation gain (< 1: closer to the teacher)

A rank reads its held-out samples once, streaming only the shards that hold them, and keeps their
bytes on local disk for the rest of the run.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.cache.reader import UnsafeName, iter_raw_shard, shard_url
from pipeline.storage import Storage

_VIEW = re.compile(r"_v\d+$")


def source_of(key: str) -> str:
    """The source image of a sample key (``<image key>_v<view>``)."""
    return _VIEW.sub("", key)


def _unit(text: str) -> float:
    """A stable, uniform number in [0, 1) for `text`."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def _units(texts: pa.Array, chunk: int = 1 << 16) -> np.ndarray:
    """`_unit` of each of `texts`, `chunk` at a time, with the arithmetic in numpy (the same floats)."""
    sha, out = hashlib.sha256, np.empty(len(texts), np.float64)
    for lo in range(0, len(texts), chunk):
        digests = b"".join([sha(t.encode()).digest()[:8] for t in texts.slice(lo, chunk).to_pylist()])
        out[lo:lo + chunk] = np.frombuffer(digests, ">u8").astype(np.float64) / 2**64
    return out


def _sources(keys: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """The source image of every key (one vectorised regex: `source_of`)."""
    return pc.replace_substring_regex(keys, _VIEW.pattern, "")


def held_out_sources(sources: pa.Array | pa.ChunkedArray, fraction: float, max_images: int | None = None) -> pa.Array:
    """Which of `sources` (the source image of every sample) are held out: those whose hash is below
    `fraction`, at most `max_images` of them (the lowest hashes), at least one if fraction > 0;
    never every image. One sha256 per distinct source."""
    if fraction <= 0 or len(sources) == 0:
        return pa.array([], pa.string())
    distinct = pc.unique(sources)
    units = _units(distinct)
    order = np.argsort(units, kind="stable")
    count = max(1, int(np.searchsorted(units[order], fraction)))  # below `fraction`, or the lowest one
    if max_images is not None:
        count = min(count, max(1, max_images))
    if count == len(distinct):
        raise ValueError(f"val_fraction={fraction} holds out all {len(distinct)} source images: nothing is left to "
                         "train on; lower it, or use val_cache=")
    return distinct.take(pa.array(order[:count]))


def held_out(keys: list[str], fraction: float, max_images: int | None = None) -> set[str]:
    """The keys whose source image is held out (`held_out_sources`)."""
    chosen = set(held_out_sources(_sources(pa.array(keys, pa.string())), fraction, max_images).to_pylist())
    return {k for k in keys if source_of(k) in chosen}


def split_manifest(manifest: pa.Table, fraction: float, max_images: int | None = None) -> tuple[pa.Table, pa.Table]:
    """(training rows, held-out rows) of a manifest."""
    sources = _sources(manifest.column("key"))
    mask = pc.is_in(sources, value_set=held_out_sources(sources, fraction, max_images))
    return manifest.filter(pc.invert(mask)), manifest.filter(mask)


def inside(root: str, *parts: str) -> str:
    """``root/parts``, refused (`UnsafeName`) unless it resolves to a path below `root` (itself
    resolved). Keys and member names are checked when a manifest or tar is read; this is the last
    check before cache contents name a local file."""
    path = os.path.realpath(os.path.join(root, *parts))
    if path == root or os.path.commonpath([root, path]) != root:
        raise UnsafeName(f"{'/'.join(parts)!r} would be written at {path}, outside {root}")
    return path


class HeldOut:
    """One rank's share of the held-out samples of a cache (`cache_url`, rows of its manifest)."""

    def __init__(self, cache_url: str, store: Storage, rows: pa.Table, rank: int, world: int):
        keys = sorted(rows.column("key").to_pylist())
        self.total, self.world = len(keys), world
        self.keys = keys[rank::world]
        shard_of = dict(zip(rows.column("key").to_pylist(), rows.column("shard").to_pylist()))
        self.shards = sorted({shard_of[k] for k in self.keys})
        self.cache_url, self.store = cache_url, store
        self.dir: str | None = None

    def _fetch(self) -> None:
        """Stream the shards that hold this rank's samples once; keep their members on local disk."""
        self.dir = os.path.realpath(tempfile.mkdtemp(prefix="spar-val-"))
        wanted = set(self.keys)
        for name in self.shards:
            for raw in iter_raw_shard(shard_url(self.cache_url, name), self.store, keep=wanted.__contains__):
                key = raw["__key__"]
                if key in wanted:  # once, should a shard hold a key twice
                    wanted.discard(key)
                    os.makedirs(inside(self.dir, key))
                    for ext, data in raw.items():
                        if not ext.startswith("__"):
                            with open(inside(self.dir, key, ext), "wb") as f:
                                f.write(data)
        if wanted:
            raise FileNotFoundError(f"held-out samples missing from their shards: {sorted(wanted)[:3]}")

    def samples(self) -> Iterator[dict]:
        """This rank's held-out samples, decoded as the training loader decodes them."""
        from pipeline.train.loader import decode_for_training

        if self.dir is None:
            self._fetch()
        for key in self.keys:
            folder = inside(self.dir, key)
            raw = {"__key__": key}
            for ext in os.listdir(folder):
                with open(os.path.join(folder, ext), "rb") as f:
                    raw[ext] = f.read()
            yield decode_for_training(raw)

    def close(self) -> None:
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def score(engine, held: HeldOut, device: torch.device, padding: torch.Tensor) -> tuple[float, int]:
    """(sum of per-sample feature MSE, samples) of this rank's held-out samples. Every rank runs the
    same number of forward passes (a rank with fewer samples runs `padding`, uncounted): under
    ZeRO-3 a forward pass is a collective."""
    import torch  # here, not above: the split's readers (the epoch planner's benchmark) need no torch

    import spar
    from pipeline.train.loader import target_to_float

    total, n = 0.0, 0
    samples = held.samples()
    with torch.no_grad(), spar.student.eval_mode(engine.module):  # no train-time augmentation in a score
        for _ in range(-(-held.total // held.world)):
            s = next(samples, None)
            image = padding if s is None else s["image"][None]
            pred = engine(engine.module.normalize(image.to(device)))
            if s is None:
                continue
            batch = {"image": image, "target": s["target"][None], **({"scale": s["scale"][None]} if "scale" in s else {})}
            total += float(spar.feature_loss(pred.float(), target_to_float(batch, device), "mse"))
            n += 1
    return total, n
