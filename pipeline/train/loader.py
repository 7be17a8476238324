"""Training data from a teacher cache: a rank's planned batches (`pipeline.train.epochs`), decoded
in background loader processes.

Each loader process streams its planned shards in order and keeps only the members of its own
samples (a shard shared with another process or rank is read for its part only): a resumed epoch
skips the batches of the steps done, whose members are passed over unread.
"""
from __future__ import annotations

import logging
from collections import Counter
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

    def __init__(self, cache_urls: str | list[str], store: Storage, plan: EpochPlan, start: int = 0,
                 verify: bool = True):
        self.cache_urls = [cache_urls] if isinstance(cache_urls, str) else list(cache_urls)
        self.store, self.plan, self.verify = store, plan, verify
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
        """Planned process `w`'s batches from its first not yet trained. A sample drawn twice in an
        epoch (a repeated cache) is in two shard runs, and read once from each."""
        batches, first = self.plan.workers[w], self.skip[w]
        unread = batches.keys_from(first)  # (cache, key) -> copies still to read
        alloc = bytearray if get_worker_info() is None else shared_buffer  # loader processes: shared memory

        def read(cache: int, name: str) -> Iterator[tuple[tuple[int, str], dict]]:
            url = shard_url(self.cache_urls[cache], name)
            for raw in iter_raw_shard(url, self.store, alloc, keep=lambda k: unread.get((cache, k), 0) > 0):
                id_ = (cache, raw["__key__"])
                if unread.get(id_, 0) > 0:  # a shard read again for a few samples passes over the others
                    unread[id_] -= 1
                    yield id_, raw

        stream = (item for cache, name in batches.runs() for item in read(cache, name))
        pending: dict[tuple[int, str], list] = {}  # (cache, key) -> [sample, copies read and not yet used]
        for index in range(first, len(batches)):
            ids = list(zip(batches.batch_caches(index), batches.batch(index)))
            for id_, copies in Counter(ids).items():  # a batch may hold a sample drawn twice
                while pending.get(id_, (None, 0))[1] < copies:
                    got, raw = next(stream)
                    if got in pending:
                        pending[got][1] += 1
                    else:
                        pending[got] = [raw, 1]
            samples = []
            for id_ in ids:
                entry = pending[id_]
                entry[1] -= 1
                if not entry[1]:
                    del pending[id_]
                samples.append(decode_for_training(entry[0], self.verify))
            yield _collate(samples, w, index, [c for c, _ in ids])


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


def _collate(samples: list[dict], worker: int, index: int, caches: list[int] | None = None) -> dict:
    out = {"keys": [s["key"] for s in samples], "caches": caches or [0] * len(samples), "image": _stack([s["image"] for s in samples]),
           "target": _stack([s["target"] for s in samples]), "worker": worker, "index": index,
           "retries": sum(retry.take_counts().values())}  # this loader process's storage retries since its last batch
    if "scale" in samples[0]:
        out["scale"] = _stack([s["scale"] for s in samples])
    return out


def make_loader(cache_urls: str | list[str], store: Storage, plan: EpochPlan, start: int = 0, *, prefetch: int = 4,
                verify: bool = True) -> DataLoader:
    """A DataLoader that decodes planned batches from step `start` on in ``len(plan.workers)``
    background processes (each reads the shards of the caches at `cache_urls`, the plan's cache
    indices, through `store`, the job's storage context)."""
    workers = len(plan.workers)
    ds = PlannedBatches(cache_urls, store, plan, start, verify)
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
