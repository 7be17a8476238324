"""Training data from a teacher cache: a rank's planned batches (`pipeline.train.epochs`), decoded
in background loader processes.

Each loader process streams its planned shards in order and keeps only the members of its own
samples (a shard shared with another process or rank is read for its part only): a resumed epoch
skips the batches of the steps done, whose members are passed over unread.
"""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import retry
from pipeline.cache.reader import decode_stored, iter_raw_shard, shard_url
from pipeline.train.epochs import EpochPlan
from pipeline.storage import Storage

log = logging.getLogger(__name__)


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
        order, n = plan.order(), len(plan.workers)
        self.skip = [sum(1 for w, _ in order[:start] if w == i) for i in range(n)]
        self.rotate = order[start][0] if start < len(order) else 0

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        n = len(self.plan.workers)
        ids = range(n) if info is None else [info.id]
        for i in ids:
            yield from self._worker((i + self.rotate) % n)

    def _worker(self, w: int) -> Iterator[dict]:
        batches, first = self.plan.workers[w], self.skip[w]
        wanted = batches.keys_from(first)
        alloc = bytearray if get_worker_info() is None else shared_buffer  # loader processes: shared memory
        stream = (raw for name in batches.shards for raw in
                  iter_raw_shard(shard_url(self.cache_url, name), self.store, alloc, keep=wanted.__contains__))
        pending: dict[str, dict] = {}
        for index in range(first, len(batches)):
            keys = batches.batch(index)
            for key in keys:
                while key not in pending:
                    raw = next(stream)
                    pending[raw["__key__"]] = raw
            samples = [decode_for_training(pending.pop(k), self.verify) for k in keys]
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
           "target": _stack([s["target"] for s in samples]), "worker": worker, "index": index,
           "retries": sum(retry.take_counts().values())}  # this loader process's storage retries since its last batch
    if "scale" in samples[0]:
        out["scale"] = _stack([s["scale"] for s in samples])
    return out


def make_loader(cache_url: str, store: Storage, plan: EpochPlan, start: int = 0, *, prefetch: int = 4,
                verify: bool = True) -> DataLoader:
    """A DataLoader that decodes planned batches from step `start` on in ``len(plan.workers)``
    background processes (each reads the shards through `store`, the job's storage context)."""
    workers = len(plan.workers)
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
