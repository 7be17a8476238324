"""Training data from a teacher cache: a deterministic epoch plan and background decoding.

The plan is a pure function of (manifest, seed, epoch, world size, loader workers, batch size),
so every rank computes every rank's plan without talking to the others:

1. shards are shuffled (seed, epoch); their samples, in tar order, form one sequence;
2. the sequence is cut into `world_size` contiguous ranges whose lengths differ by at most one,
   so each rank streams whole shards except at its two ends (disjoint, every sample once);
3. a rank's range is cut the same way among its loader workers; each worker shuffles its part
   through a seeded buffer and groups it into batches of one image size (never padding);
4. every rank runs ``steps_per_epoch`` = the largest rank's batch count; ranks that run out pad
   with zero-weight steps so collectives stay aligned.

Each batch says which worker made it and its index, so a checkpoint stores how many batches of
each worker were consumed, and a resumed epoch skips exactly those (their bytes are read, not
decoded).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.cache.reader import decode_stored, iter_raw_shard, shard_url
from pipeline.storage import Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleRef:
    """Where one sample lives and its image size (from the manifest)."""

    key: str
    shard: str
    height: int
    width: int


def manifest_refs(manifest: pa.Table) -> dict[str, list[SampleRef]]:
    """Samples per shard, in tar order."""
    out: dict[str, list[SampleRef]] = {}
    cols = [manifest.column(c).to_pylist() for c in ("key", "shard", "height", "width")]
    for key, shard, h, w in zip(*cols):
        out.setdefault(shard, []).append(SampleRef(key, shard, h, w))
    return out


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges of sizes differing by at most one (longer ones first)."""
    base, extra = divmod(n, parts)
    bounds, lo = [], 0
    for i in range(parts):
        hi = lo + base + (1 if i < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def _buffer_shuffle(refs: list[SampleRef], size: int, rng: np.random.Generator) -> list[SampleRef]:
    """Order a stream would come out of a shuffle buffer of `size` (1 = no shuffling)."""
    if size <= 1:
        return list(refs)
    buf, out = [], []
    for r in refs:
        buf.append(r)
        if len(buf) >= size:
            out.append(buf.pop(int(rng.integers(len(buf)))))
    while buf:
        out.append(buf.pop(int(rng.integers(len(buf)))))
    return out


def _bucket(refs: list[SampleRef], batch_size: int, window: int) -> list[list[SampleRef]]:
    """Batches of one image size, in stream order. When more than `window` samples wait in
    partial buckets, the oldest bucket leaves as a smaller batch (memory stays bounded even
    when sizes rarely repeat)."""
    buckets: dict[tuple[int, int], list[SampleRef]] = {}  # insertion order = age
    waiting, batches = 0, []
    for r in refs:
        b = buckets.setdefault((r.height, r.width), [])
        b.append(r)
        waiting += 1
        if len(b) == batch_size:
            batches.append(buckets.pop((r.height, r.width)))
            waiting -= batch_size
        elif waiting > window:
            oldest = next(iter(buckets))
            waiting -= len(buckets[oldest])
            batches.append(buckets.pop(oldest))
    batches.extend(buckets.values())
    return batches


@dataclass
class EpochPlan:
    """Batches of every loader worker of one rank for one epoch, and the common step count."""

    worker_batches: list[list[list[SampleRef]]]
    worker_shards: list[list[str]]  # shards each loader worker streams, in order
    steps: int  # steps every rank runs this epoch (max over ranks)

    @property
    def real_steps(self) -> int:
        return sum(len(b) for b in self.worker_batches)


def plan_epoch(refs: dict[str, list[SampleRef]], *, seed: int, epoch: int, rank: int, world_size: int,
               workers: int, batch_size: int, shuffle_buffer: int, bucket_window: int | None = None) -> EpochPlan:
    """The plan of `rank` for `epoch` (see the module docstring)."""
    window = bucket_window if bucket_window is not None else 4 * batch_size
    names = sorted(refs)
    order = np.random.default_rng([seed, epoch]).permutation(len(names))
    flat = [r for i in order for r in refs[names[i]]]
    if len(flat) < world_size:
        raise ValueError(f"{len(flat)} samples cannot feed {world_size} workers")
    counts, mine, streams = [], None, None
    for r, (lo, hi) in enumerate(_split(len(flat), world_size)):
        part = flat[lo:hi]
        batches, shard_lists = [], []
        for w, (a, b) in enumerate(_split(len(part), workers)):
            rng = np.random.default_rng([seed, epoch, r, w])
            batches.append(_bucket(_buffer_shuffle(part[a:b], shuffle_buffer, rng), batch_size, window))
            shard_lists.append(list(dict.fromkeys(ref.shard for ref in part[a:b])))
        counts.append(sum(len(b) for b in batches))
        if r == rank:
            mine, streams = batches, shard_lists
    return EpochPlan(mine, streams, max(counts))


def decode_for_training(raw: dict, verify: bool = True) -> dict:
    """Image as uint8 and the target in its stored dtype (dequantised later, on the device)."""
    s = decode_stored(raw, verify)
    out = {"key": s["key"], "image": torch.from_numpy(s["image"]), "target": torch.from_numpy(s["target"].copy())}
    if "scale" in s:
        out["scale"] = torch.from_numpy(s["scale"].copy())
    return out


class PlannedBatches(IterableDataset):
    """Yields this rank's planned batches; loader worker ``w`` makes ``worker_batches[w]``."""

    def __init__(self, cache_url: str, store: Storage, plan: EpochPlan, skip: list[int], verify: bool = True):
        self.cache_url, self.store, self.plan, self.skip, self.verify = cache_url, store, plan, skip, verify

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers = range(len(self.plan.worker_batches)) if info is None else [info.id]
        for w in workers:
            yield from self._worker(w)

    def _worker(self, w: int) -> Iterator[dict]:
        batches = self.plan.worker_batches[w]
        skipped = {r.key for b in batches[: self.skip[w]] for r in b}
        wanted = {r.key for b in batches for r in b}
        stream = (raw for name in self.plan.worker_shards[w]
                  for raw in iter_raw_shard(shard_url(self.cache_url, name), self.store))
        pending: dict[str, dict] = {}
        for index in range(self.skip[w], len(batches)):
            for ref in batches[index]:
                while ref.key not in pending:
                    raw = next(stream)
                    if raw["__key__"] in wanted and raw["__key__"] not in skipped:
                        pending[raw["__key__"]] = raw
            samples = [decode_for_training(pending.pop(r.key), self.verify) for r in batches[index]]
            yield _collate(samples, w, index)


def _collate(samples: list[dict], worker: int, index: int) -> dict:
    out = {"keys": [s["key"] for s in samples], "image": torch.stack([s["image"] for s in samples]),
           "target": torch.stack([s["target"] for s in samples]), "worker": worker, "index": index}
    if "scale" in samples[0]:
        out["scale"] = torch.stack([s["scale"] for s in samples])
    return out


def make_loader(cache_url: str, store: Storage, plan: EpochPlan, skip: list[int], *, prefetch: int = 4,
                verify: bool = True) -> DataLoader:
    """A DataLoader that decodes planned batches in ``len(plan.worker_batches)`` background processes
    (each reads the shards through `store`, the job's storage context)."""
    workers = len(plan.worker_batches)
    ds = PlannedBatches(cache_url, store, plan, skip, verify)
    if workers == 0:
        raise ValueError("at least one loader worker is needed")
    return DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=prefetch,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())


def target_to_float(batch: dict, device: torch.device) -> torch.Tensor:
    """The batch's targets as float32 on `device` (int8 scales applied there)."""
    target = batch["target"].to(device, non_blocking=True)
    if "scale" in batch:
        return target.float() * batch["scale"].to(device, non_blocking=True).float()
    return target.float()
