"""Training data from a teacher cache: a deterministic epoch plan and background decoding.

The plan is a pure function of (manifest, seed, epoch, world size, loader workers, batch size),
so every rank computes every rank's plan without talking to the others:

1. shards are shuffled (seed, epoch); their samples, in tar order, form one sequence;
2. the sequence is cut into `world_size` contiguous ranges whose lengths differ by at most one,
   so each rank streams whole shards except at its two ends (disjoint, every sample once);
3. a rank's range is cut the same way among its loader workers; each worker shuffles its part
   through a seeded buffer and groups it into batches of one image size (never padding);
4. a rank's steps take its workers' batches in turn (the order a DataLoader yields them); every
   rank runs the same number of steps, the largest rank's batch count rounded up to whole gradient
   accumulation windows; ranks that run out pad with zero-weight steps so collectives stay aligned,
   and since every rank knows every rank's batches, each knows how many real samples a step has
   (the loss is weighted to average over those, never over padding).

A position in an epoch is therefore one number, the step: a resumed epoch with the same layout
(ranks, loader workers, batch size, shuffle buffer) skips the batches of the steps done (their
members are passed over unread, as are other workers' samples in a shard they share). A resume
with another layout marks the samples the old layout trained as done and plans the rest of the
epoch over the new one (a new *segment*); the next epoch is planned as any run of the new layout
would plan it.
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


def interleave(lengths: list[int]) -> list[tuple[int, int]]:
    """(loader process, batch index) in the order a DataLoader yields its processes' batches: one from
    each in turn, skipping those that are used up."""
    return [(w, j) for j in range(max(lengths, default=0)) for w in range(len(lengths)) if j < lengths[w]]


@dataclass
class EpochPlan:
    """This rank's batches for (the current segment of) one epoch, and what every rank does per step."""

    worker_batches: list[list[list[SampleRef]]]  # per loader process
    worker_shards: list[list[str]]  # shards each loader process streams, in order
    steps: int  # steps every rank runs (the most any rank has, rounded up to whole accumulation windows)
    step_samples: list[int]  # real samples at each step, all ranks together (0: every rank pads)

    @property
    def real_steps(self) -> int:
        return sum(len(b) for b in self.worker_batches)

    def order(self) -> list[tuple[int, int]]:
        """(loader process, batch index) of each of this rank's real steps, in step order."""
        return interleave([len(b) for b in self.worker_batches])

    def ordered_batches(self) -> list[list[SampleRef]]:
        return [self.worker_batches[w][j] for w, j in self.order()]

    def window_samples(self, step: int, window: int) -> int:
        """Real samples, all ranks, in the accumulation window of `window` steps that holds `step`."""
        lo = step - step % window
        return sum(self.step_samples[lo:lo + window])


def epoch_order(refs: dict[str, list[SampleRef]], *, seed: int, epoch: int) -> list[SampleRef]:
    """Every sample once, in the epoch's order: shards shuffled (seed, epoch), samples in tar order."""
    names = sorted(refs)
    order = np.random.default_rng([seed, epoch]).permutation(len(names))
    return [r for i in order for r in refs[names[i]]]


def plan_ranks(refs: dict[str, list[SampleRef]], *, seed: int, epoch: int, world_size: int, workers: int,
               batch_size: int, shuffle_buffer: int, done: frozenset[int] = frozenset(), segment: int = 0,
               bucket_window: int | None = None) -> list[tuple[list[list[list[SampleRef]]], list[list[str]]]]:
    """(batches per loader process, shards per loader process) of every rank; samples at positions
    `done` of the epoch order were trained in earlier segments of the epoch and are left out."""
    window = bucket_window if bucket_window is not None else 4 * batch_size
    flat = [r for i, r in enumerate(epoch_order(refs, seed=seed, epoch=epoch)) if i not in done]
    if not done and len(flat) < world_size:
        raise ValueError(f"{len(flat)} samples cannot feed {world_size} workers")
    out = []
    for r, (lo, hi) in enumerate(_split(len(flat), world_size)):
        part = flat[lo:hi]
        batches, shard_lists = [], []
        for w, (a, b) in enumerate(_split(len(part), workers)):
            rng = np.random.default_rng([seed, epoch, r, w] + ([segment] if segment else []))
            batches.append(_bucket(_buffer_shuffle(part[a:b], shuffle_buffer, rng), batch_size, window))
            shard_lists.append(list(dict.fromkeys(ref.shard for ref in part[a:b])))
        out.append((batches, shard_lists))
    return out


def plan_epoch(refs: dict[str, list[SampleRef]], *, seed: int, epoch: int, rank: int, world_size: int,
               workers: int, batch_size: int, shuffle_buffer: int, done: frozenset[int] = frozenset(),
               segment: int = 0, step_multiple: int = 1, bucket_window: int | None = None) -> EpochPlan:
    """The plan of `rank` for `epoch` (see the module docstring)."""
    ranks = plan_ranks(refs, seed=seed, epoch=epoch, world_size=world_size, workers=workers, batch_size=batch_size,
                       shuffle_buffer=shuffle_buffer, done=done, segment=segment, bucket_window=bucket_window)
    orders = [[batches[w][j] for w, j in interleave([len(b) for b in batches])] for batches, _ in ranks]
    steps = max(len(o) for o in orders)
    steps = -(-steps // step_multiple) * step_multiple
    step_samples = [sum(len(o[s]) for o in orders if s < len(o)) for s in range(steps)]
    mine, shards = ranks[rank]
    return EpochPlan(mine, shards, steps, step_samples)


def trained_positions(refs: dict[str, list[SampleRef]], *, seed: int, epoch: int, layout: dict, steps: int,
                      done: frozenset[int] = frozenset(), segment: int = 0) -> set[int]:
    """Positions (in the epoch order) trained by every rank in the first `steps` steps of a segment
    planned with `layout`, plus `done`."""
    position = {r.key: i for i, r in enumerate(epoch_order(refs, seed=seed, epoch=epoch))}
    ranks = plan_ranks(refs, seed=seed, epoch=epoch, world_size=layout["world_size"],
                       workers=layout["loader_workers"], batch_size=layout["batch_size"],
                       shuffle_buffer=layout["shuffle_buffer"], done=done, segment=segment)
    out = set(done)
    for batches, _ in ranks:
        for w, j in interleave([len(b) for b in batches])[:steps]:
            out.update(position[r.key] for r in batches[w][j])
    return out


def shared_buffer(size: int) -> np.ndarray:
    """A writable ``size``-byte buffer in shared memory (a numpy view of a torch storage made with
    `_new_shared`): members read into it reach the training process without a copy."""
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(size)).numpy()


def _tensor(array: np.ndarray) -> torch.Tensor:
    """`array` as a tensor. One that views a `shared_buffer` becomes a view of that buffer's shared
    storage (torch would otherwise copy it into new shared memory to pass it between processes)."""
    owner = array
    while isinstance(owner, np.ndarray) and isinstance(owner.base, np.ndarray):
        owner = owner.base
    if isinstance(owner.base, torch.Tensor) and array.flags.c_contiguous:
        flat = owner.base
        offset = array.ctypes.data - flat.data_ptr()
        dtype = torch.from_numpy(array[:0].reshape(0)).dtype
        return flat[offset:offset + array.nbytes].view(dtype).view(array.shape)
    return torch.from_numpy(array)


def decode_for_training(raw: dict, verify: bool = True) -> dict:
    """Image as uint8 and the target in its stored dtype (dequantised later, on the device); arrays
    decoded in place from the member buffers stay views of them."""
    s = decode_stored(raw, verify)
    out = {"key": s["key"], "image": _tensor(s["image"]), "target": _tensor(s["target"])}
    if "scale" in s:
        out["scale"] = _tensor(s["scale"])
    return out


class PlannedBatches(IterableDataset):
    """Yields this rank's planned batches from its `start`-th step on, in plan order.

    The DataLoader asks its processes for batches in turn, starting with process 0. A resumed epoch
    starts with whichever loader process is next in the plan's order, so process ``i`` makes the
    batches of planned process ``(i + rotate) % n``, each from its first batch not yet trained.
    """

    def __init__(self, cache_url: str, store: Storage, plan: EpochPlan, start: int = 0, verify: bool = True):
        self.cache_url, self.store, self.plan, self.verify = cache_url, store, plan, verify
        order, n = plan.order(), len(plan.worker_batches)
        self.skip = [sum(1 for w, _ in order[:start] if w == i) for i in range(n)]
        self.rotate = order[start][0] if start < len(order) else 0

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        n = len(self.plan.worker_batches)
        ids = range(n) if info is None else [info.id]
        for i in ids:
            yield from self._worker((i + self.rotate) % n)

    def _worker(self, w: int) -> Iterator[dict]:
        batches, first = self.plan.worker_batches[w], self.skip[w]
        wanted = {r.key for b in batches[first:] for r in b}
        alloc = bytearray if get_worker_info() is None else shared_buffer  # loader processes: shared memory
        stream = (raw for name in self.plan.worker_shards[w] for raw in
                  iter_raw_shard(shard_url(self.cache_url, name), self.store, alloc, keep=wanted.__contains__))
        pending: dict[str, dict] = {}
        for index in range(first, len(batches)):
            for ref in batches[index]:
                while ref.key not in pending:
                    raw = next(stream)
                    pending[raw["__key__"]] = raw
            samples = [decode_for_training(pending.pop(r.key), self.verify) for r in batches[index]]
            yield _collate(samples, w, index)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One batch tensor; in a loader process it is written straight into shared memory (as torch's
    default collate does), so handing it to the training process copies nothing more. A batch of
    one is a view of its sample."""
    if len(tensors) == 1:
        return tensors[0].unsqueeze(0)
    if get_worker_info() is None:
        return torch.stack(tensors)
    first = tensors[0]
    out = first.new(first.untyped_storage()._new_shared(len(tensors) * first.nbytes)).view(len(tensors), *first.shape)
    return torch.stack(tensors, out=out)


def _collate(samples: list[dict], worker: int, index: int) -> dict:
    out = {"keys": [s["key"] for s in samples], "image": _stack([s["image"] for s in samples]),
           "target": _stack([s["target"] for s in samples]), "worker": worker, "index": index}
    if "scale" in samples[0]:
        out["scale"] = _stack([s["scale"] for s in samples])
    return out


def make_loader(cache_url: str, store: Storage, plan: EpochPlan, start: int = 0, *, prefetch: int = 4,
                verify: bool = True) -> DataLoader:
    """A DataLoader that decodes planned batches from step `start` on in ``len(plan.worker_batches)``
    background processes (each reads the shards through `store`, the job's storage context)."""
    workers = len(plan.worker_batches)
    ds = PlannedBatches(cache_url, store, plan, start, verify)
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
