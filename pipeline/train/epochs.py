"""The epoch plan: which samples every rank and loader process trains, in which batches and steps.

The plan is a pure function of (the samples, seed, epoch, world size, loader processes, batch size,
shuffle block), so every rank computes every rank's plan without talking to the others:

1. shards are shuffled (seed, epoch); their samples, in key order, form one sequence (the epoch order);
2. the sequence is cut into `world_size` contiguous ranges whose lengths differ by at most one,
   so each rank streams whole shards except at its two ends (disjoint, every sample once);
3. a rank's range is cut the same way among its loader processes (*streams*). A stream is shuffled
   within consecutive blocks of `shuffle_buffer` samples, then cut into consecutive windows of
   `bucket_window` samples (default 4 batches); in a window, the samples of one image size form
   batches of `batch_size` in stream order (the last of each size may be smaller: never padding),
   and batches leave in the order their last sample arrives;
4. a rank's steps take its streams' batches in turn (the order a DataLoader yields them); every
   rank runs the same number of steps, the largest rank's batch count rounded up to whole gradient
   accumulation windows; ranks that run out pad with zero-weight steps so collectives stay aligned,
   and since every rank knows every rank's batches, each knows how many real samples a step has
   (the loss is weighted to average over those, never over padding).

A loader process holds about ``shuffle_buffer + bucket_window`` decoded samples, plus at most one
shard's (it reads a tar in tar order, the plan orders a shard's samples by key).

Everything is computed with numpy over arrays of every sample (a few int32 and int64 per sample,
no per-sample Python object): 11 million samples plan in seconds on every rank, and a rank turns
only its own part into keys. A position in an epoch is one number, the step: a resumed epoch with
the same layout skips the batches of the steps done. A resume onto another layout marks the
samples the old layout trained as done (`trained_positions`) and plans the rest of the epoch over
the new one (a new *segment*, with its own shuffle).

A *mixture* of caches (`SampleTable.concat`) is one table whose shards are those of every cache,
each cache's rows contiguous. By default an epoch draws every sample of every cache once. With
`draw` (samples per epoch of each cache, `draw_counts`) cache i is drawn n_i times: n_i // N_i
whole passes over its N_i samples, plus a subset of n_i % N_i of them chosen at random (seed,
epoch, cache): a smaller cache is repeated, a larger one subsampled. The drawn samples of a shard
in one pass form one *shard run* (its samples in key order); step 1 shuffles the runs of every
cache together. Every drawn sample, repeats included, has its own position in the epoch order, so
every guarantee above holds per position.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PLANNER = 2  # recorded in checkpoints: a mid-epoch position means something only to the planner that made it


@dataclass(frozen=True)
class SampleTable:
    """What planning needs of a manifest, as arrays: rows sorted by (shard, key)."""

    source_keys: pa.ChunkedArray  # sample keys as the manifest's table holds them (shared, not copied)
    key_row: np.ndarray  # int64 per row: its key's index in `source_keys`
    shard_names: pa.Array  # sorted; shard c holds rows shard_start[c]:shard_start[c + 1]
    shard_start: np.ndarray  # int64, one more than there are shards
    size: np.ndarray  # int32 per row: its image size, an index into `sizes`
    sizes: np.ndarray  # (S, 2) int32: distinct (height, width)
    shard_cache: np.ndarray | None = None  # int32 per shard: the cache it belongs to (a mixture); None: one cache
    num_caches: int = 1
    draw: np.ndarray | None = None  # int64 per cache: samples an epoch draws from it; None: every sample once

    @classmethod
    def from_table(cls, rows: pa.Table) -> "SampleTable":
        """From a table with columns key, shard, height and width (a cache's `samples`, any order);
        its key column is shared, not copied."""
        shard = rows.column("shard")
        shard = (shard if pa.types.is_dictionary(shard.type) else pc.dictionary_encode(shard)).unify_dictionaries()
        names = shard.chunk(0).dictionary if shard.num_chunks else pa.array([], pa.string())
        rank = np.argsort(np.argsort(names.to_numpy(zero_copy_only=False), kind="stable"))  # codes -> name order
        rank = rank.astype(np.int32)
        codes = np.concatenate([rank[c.indices.to_numpy()] for c in shard.chunks]) if shard.num_chunks else \
            np.zeros(0, np.int32)
        keys = rows.column("key")
        order = pc.sort_indices(pa.table({"shard": codes, "key": keys}),
                                [("shard", "ascending"), ("key", "ascending")]).to_numpy().view(np.int64)
        codes = codes[order]
        bounds = np.searchsorted(codes, np.arange(len(names) + 1))
        del codes
        used = np.flatnonzero(np.diff(bounds))  # shards with samples (a dictionary may name others)
        hw = rows.column("height").to_numpy().astype(np.int64)
        hw <<= 32
        hw |= rows.column("width").to_numpy()
        sizes, size = np.unique(hw, return_inverse=True)
        del hw
        size = size.astype(np.int32)[order]
        return cls(keys if isinstance(keys, pa.ChunkedArray) else pa.chunked_array([keys]), order,
                   names.take(np.argsort(rank)[used]), np.append(bounds[used], len(order)).astype(np.int64),
                   size, np.stack([sizes >> 32, sizes & 0xFFFFFFFF], axis=1).astype(np.int32))

    @classmethod
    def concat(cls, tables: list["SampleTable"]) -> "SampleTable":
        """A mixture: the shards of every table, table after table (so each cache's rows are contiguous)."""
        if len(tables) == 1:
            return tables[0]
        sizes, size = np.unique(np.concatenate([t.sizes for t in tables]), axis=0, return_inverse=True)
        size = size.reshape(-1).astype(np.int32)
        offsets = np.cumsum([0] + [len(t.sizes) for t in tables])
        keys_type = tables[0].source_keys.type
        key_base = np.cumsum([0] + [len(t.source_keys) for t in tables])
        row_base = np.cumsum([0] + [len(t) for t in tables])
        return cls(
            pa.chunked_array([c.cast(keys_type) for t in tables for c in t.source_keys.chunks], keys_type),
            np.concatenate([t.key_row + key_base[i] for i, t in enumerate(tables)]),
            pa.concat_arrays([t.shard_names.cast(pa.string()) for t in tables]),
            np.append(np.concatenate([t.shard_start[:-1] + row_base[i] for i, t in enumerate(tables)]), row_base[-1]),
            np.concatenate([size[offsets[i] + t.size] for i, t in enumerate(tables)]).astype(np.int32),
            sizes.astype(np.int32),
            np.repeat(np.arange(len(tables), dtype=np.int32), [t.num_shards for t in tables]), len(tables))

    def with_draw(self, draw: list[int] | np.ndarray | None) -> "SampleTable":
        """This table drawn `draw[i]` samples of cache i per epoch (None: every sample once)."""
        from dataclasses import replace

        if draw is not None:
            draw = np.asarray(draw, dtype=np.int64)
            if len(draw) != self.num_caches or (draw < 0).any():
                raise ValueError(f"draw {draw.tolist()}: one count >= 0 per cache ({self.num_caches})")
        return replace(self, draw=draw)

    def __len__(self) -> int:
        return len(self.key_row)

    def cache_rows(self) -> np.ndarray:
        """Row bounds of each cache: cache i holds rows bounds[i]:bounds[i + 1]."""
        if self.shard_cache is None:
            return np.array([0, len(self)], dtype=np.int64)
        first = np.searchsorted(self.shard_cache, np.arange(self.num_caches + 1))
        return self.shard_start[first]

    def cache_sizes(self) -> np.ndarray:
        """Samples in each cache."""
        return np.diff(self.cache_rows())

    @property
    def epoch_length(self) -> int:
        """Positions in an epoch's order: samples drawn, repeats included."""
        return len(self) if self.draw is None else int(self.draw.sum())

    def cache_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """The cache (int8) of each of `rows`."""
        return (np.searchsorted(self.cache_rows(), rows, side="right") - 1).astype(np.int8)

    def keys_of(self, rows: np.ndarray) -> pa.Array:
        """The keys of `rows`, in that order (taken chunk by chunk: a take from a chunked array
        would first copy every key into one)."""
        at = self.key_row[np.asarray(rows, dtype=np.int64)]
        starts = np.cumsum([0] + [len(c) for c in self.source_keys.chunks])
        chunk = np.searchsorted(starts, at, side="right") - 1
        by_chunk = np.argsort(chunk, kind="stable")
        at, chunk = at[by_chunk], chunk[by_chunk]
        cuts = np.searchsorted(chunk, np.arange(self.source_keys.num_chunks + 1))
        parts = [self.source_keys.chunk(c).take(pa.array(at[cuts[c]:cuts[c + 1]] - starts[c]))
                 for c in range(self.source_keys.num_chunks) if cuts[c + 1] > cuts[c]]
        taken = pa.concat_arrays(parts) if parts else pa.array([], self.source_keys.type)
        return taken.take(pa.array(np.argsort(by_chunk)))

    @property
    def num_shards(self) -> int:
        return len(self.shard_start) - 1


def check_weights(weights: list[float], caches: int) -> None:
    """Refuse mix weights that are not one number >= 0 per cache, not all 0 (ValueError)."""
    if len(weights) != caches or any(w < 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"mix={list(weights)}: one weight >= 0 per cache ({caches} in cache=), not all 0")


def draw_counts(sizes: list[int], weights: list[float] | None = None, total: int | None = None) -> list[int]:
    """Samples an epoch draws from each cache: `total` (default: every sample of every cache,
    ``sum(sizes)``) split in proportion to `weights` (largest remainders; ties to the first cache);
    without weights, each cache's own size (``total`` must then be unset)."""
    if weights is None:
        if total is not None and total != sum(sizes):
            raise ValueError(f"epoch_samples={total} needs mix= weights to split it among the caches")
        return [int(n) for n in sizes]
    check_weights(weights, len(sizes))
    total = sum(sizes) if total is None else total
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))[:total - sum(counts)]:
        counts[i] += 1
    empty = [i for i, (n, size) in enumerate(zip(counts, sizes)) if n and not size]
    if empty:
        raise ValueError(f"mix gives cache {empty[0]} {counts[empty[0]]} draws per epoch, but it has no samples "
                         "to train on")
    return counts


def epoch_order(table: SampleTable, *, seed: int, epoch: int) -> np.ndarray:
    """The row of every position of the epoch's order: shard runs shuffled (seed, epoch), samples in
    key order within a run (`epoch_runs`)."""
    return epoch_runs(table, seed=seed, epoch=epoch)[0]


def epoch_runs(table: SampleTable, *, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(the row of each position of the epoch's order, the start position of each shard run and the
    order's length). Without a draw, a run is a whole shard: every row once."""
    shard_len = np.diff(table.shard_start)
    if table.draw is None or np.array_equal(table.draw, table.cache_sizes()):
        pool, starts, lengths = None, table.shard_start[:-1], shard_len
    else:
        starts, lengths, picked = [], [], []
        at = len(table)  # `pool` is every row, then each cache's partly drawn rows
        bounds = table.cache_rows()
        shard_bounds = np.searchsorted(table.shard_start, bounds)
        for i, n in enumerate(table.draw.tolist()):
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            whole, part = divmod(n, hi - lo) if hi > lo else (0, 0)
            shards = slice(shard_bounds[i], shard_bounds[i + 1])
            for _ in range(whole):
                starts.append(table.shard_start[shards])
                lengths.append(shard_len[shards])
            if part:
                rng = np.random.default_rng([seed, epoch, 1, i])
                rows = lo + np.sort(rng.permutation(hi - lo)[:part])
                shard = np.searchsorted(table.shard_start, rows, side="right") - 1
                first = np.flatnonzero(np.append(True, shard[1:] != shard[:-1]))
                starts.append(at + first)
                lengths.append(np.diff(np.append(first, part)))
                picked.append(rows)
                at += part
        pool = np.concatenate([np.arange(len(table), dtype=np.int64), *picked])
        starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    perm = np.random.default_rng([seed, epoch]).permutation(len(starts))
    lengths = lengths[perm]
    positions = _ranges(starts[perm], lengths)
    return (positions if pool is None else pool[positions]), np.append(0, np.cumsum(lengths)).astype(np.int64)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of ``arange(s, s + n)`` for every (s, n)."""
    ends = np.cumsum(lengths)
    return np.arange(ends[-1] if len(ends) else 0, dtype=np.int64) + np.repeat(starts - (ends - lengths), lengths)


def split_bounds(n: np.ndarray | int, parts: int) -> np.ndarray:
    """Start offsets (shape ``(..., parts + 1)``) of `parts` contiguous ranges of each `n`, sizes
    differing by at most one (longer ones first)."""
    n = np.asarray(n, dtype=np.int64)[..., None]
    i = np.arange(parts + 1, dtype=np.int64)
    return i * (n // parts) + np.minimum(i, n % parts)


@dataclass
class Batches:
    """Every rank's batches of one segment of an epoch, sorted by stream, then by index."""

    members: np.ndarray  # positions in the epoch order, batch after batch (each in stream order)
    bounds: np.ndarray  # batch b is members[bounds[b]:bounds[b + 1]]
    stream: np.ndarray  # the stream (rank * workers + loader process) of each batch
    step: np.ndarray  # the step of its rank at which each batch is trained
    order: np.ndarray  # the epoch order (`epoch_order`): row of each position
    runs: np.ndarray  # start position of each shard run of the epoch order, and its length
    kept: np.ndarray  # the positions planned (those not done), in epoch order
    stream_bounds: np.ndarray  # stream s streams kept[stream_bounds[s]:stream_bounds[s + 1]]

    def counts(self) -> np.ndarray:
        return np.diff(self.bounds)


def plan_batches(table: SampleTable, *, seed: int, epoch: int, world_size: int, workers: int, batch_size: int,
                 shuffle_buffer: int, done: np.ndarray | None = None, segment: int = 0,
                 bucket_window: int | None = None) -> Batches:
    """Every rank's batches (see the module docstring); positions flagged in `done` (a bool per
    position of the epoch order) were trained in earlier segments of the epoch and are left out."""
    window = bucket_window if bucket_window is not None else 4 * batch_size
    order, runs = epoch_runs(table, seed=seed, epoch=epoch)
    resumed = done is not None and bool(done.any())
    kept = np.flatnonzero(~done) if resumed else np.arange(len(order), dtype=np.int64)
    n = len(kept)
    if not resumed and n < world_size:
        raise ValueError(f"{n} samples cannot feed {world_size} workers")
    rank_bounds = split_bounds(n, world_size)
    stream_bounds = np.append(rank_bounds[:-1, None] + split_bounds(np.diff(rank_bounds), workers)[:, :-1], n)
    lengths = np.diff(stream_bounds)
    sid = np.repeat(np.arange(world_size * workers, dtype=np.int64), lengths)  # stream of each kept position
    local = np.arange(n, dtype=np.int64) - stream_bounds[sid]  # and its place in the stream

    # shuffle each stream within its blocks: one sort by (block, random); blocks follow stream order
    shuffled = kept
    if shuffle_buffer > 1:
        rng = np.random.default_rng([seed, epoch, segment])
        block = np.cumsum(np.append(0, -(-lengths // shuffle_buffer)))[sid] + local // shuffle_buffer
        shuffled = kept[np.argsort((block << 32) | rng.integers(0, 1 << 32, n, dtype=np.int64), kind="stable")]
        del block

    # in each window of a stream, the samples of one size in stream order (a stable sort by group)
    size = table.size[order[shuffled]].astype(np.int64)
    group = (np.cumsum(np.append(0, -(-lengths // window)))[sid] + local // window) * len(table.sizes) + size
    del size, local
    by_group = np.argsort(group, kind="stable")
    group = group[by_group]
    first = np.ones(n, dtype=bool)
    first[1:] = group[1:] != group[:-1]
    del group
    group_start = np.flatnonzero(first)
    del first
    place = np.arange(n, dtype=np.int64) - np.repeat(group_start, np.diff(np.append(group_start, n)))
    del group_start
    starts = np.flatnonzero(place % batch_size == 0)  # each group cut into batches of batch_size
    del place
    last = by_group[np.append(starts[1:], n) - 1]  # a batch leaves when its last sample arrives
    counts = np.diff(np.append(starts, n))
    emitted = np.argsort(last)  # streams are contiguous in the shuffled order: batches sort by stream too
    starts, counts, stream = starts[emitted], counts[emitted], sid[last[emitted]]
    del last, emitted, sid
    members = shuffled[by_group[_ranges(starts, counts)]]
    del by_group, shuffled
    return Batches(members, np.append(0, np.cumsum(counts)), stream, _steps(stream, workers), order, runs, kept,
                   stream_bounds)


def _steps(stream: np.ndarray, workers: int) -> np.ndarray:
    """The step of each batch (sorted by stream, then index): a rank takes its streams' batches in
    turn, one from each, skipping the streams that are used up (the order a DataLoader yields)."""
    first = np.searchsorted(stream, np.arange(stream[-1] + 2 if len(stream) else 1))  # each stream's first batch
    index = np.arange(len(stream), dtype=np.int64) - first[stream]
    rank, worker = stream // workers, stream % workers
    turn = np.lexsort((worker, index, rank))  # by rank, then index, then loader process
    step = np.empty(len(stream), dtype=np.int64)
    rank_sorted = rank[turn]
    rank_first = np.searchsorted(rank_sorted, rank_sorted)
    step[turn] = np.arange(len(stream), dtype=np.int64) - rank_first
    return step


@dataclass
class WorkerPlan:
    """One loader process's batches: keys, batch after batch, and the shard runs it streams, in order
    (in a mixture, with the cache of each key and of each shard)."""

    keys: pa.Array
    bounds: np.ndarray  # batch j is keys[bounds[j]:bounds[j + 1]]
    shards: list[str]
    caches: np.ndarray | None = None  # int8 per key: its cache (index in the run's list); None: cache 0
    shard_caches: list[int] | None = None  # the cache of each of `shards`

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def batch(self, j: int) -> list[str]:
        return self.keys[int(self.bounds[j]):int(self.bounds[j + 1])].to_pylist()

    def batch_caches(self, j: int) -> list[int]:
        """The cache of each key of batch j."""
        if self.caches is None:
            return [0] * int(self.bounds[j + 1] - self.bounds[j])
        return self.caches[int(self.bounds[j]):int(self.bounds[j + 1])].tolist()

    def keys_from(self, j: int) -> dict[tuple[int, str], int]:
        """(cache, key) -> how many times batches j and later hold it (more than once: a repeated cache)."""
        keys = self.keys[int(self.bounds[j]):].to_pylist()
        caches = [0] * len(keys) if self.caches is None else self.caches[int(self.bounds[j]):].tolist()
        return dict(Counter(zip(caches, keys)))

    def runs(self) -> list[tuple[int, str]]:
        """(cache, shard name) of each shard run this process streams, in order."""
        return list(zip(self.shard_caches or [0] * len(self.shards), self.shards))


def interleave(lengths: list[int]) -> list[tuple[int, int]]:
    """(loader process, batch index) in the order a DataLoader yields its processes' batches: one from
    each in turn, skipping those that are used up."""
    return [(w, j) for j in range(max(lengths, default=0)) for w in range(len(lengths)) if j < lengths[w]]


@dataclass
class EpochPlan:
    """This rank's batches for (the current segment of) one epoch, and what every rank does per step."""

    workers: list[WorkerPlan]  # per loader process
    steps: int  # steps every rank runs (the most any rank has, rounded up to whole accumulation windows)
    step_samples: list[int]  # real samples at each step, all ranks together (0: every rank pads)

    @property
    def real_steps(self) -> int:
        return sum(len(w) for w in self.workers)

    def order(self) -> list[tuple[int, int]]:
        """(loader process, batch index) of each of this rank's real steps, in step order."""
        return interleave([len(w) for w in self.workers])

    def ordered_batches(self) -> list[list[str]]:
        """This rank's batches' keys, in step order."""
        return [self.workers[w].batch(j) for w, j in self.order()]

    def window_samples(self, step: int, window: int) -> int:
        """Real samples, all ranks, in the accumulation window of `window` steps that holds `step`."""
        lo = step - step % window
        return sum(self.step_samples[lo:lo + window])


def plan_epoch(table: SampleTable, *, seed: int, epoch: int, rank: int, world_size: int, workers: int,
               batch_size: int, shuffle_buffer: int, done: np.ndarray | None = None, segment: int = 0,
               step_multiple: int = 1, bucket_window: int | None = None) -> EpochPlan:
    """The plan of `rank` for `epoch` (see the module docstring)."""
    b = plan_batches(table, seed=seed, epoch=epoch, world_size=world_size, workers=workers, batch_size=batch_size,
                     shuffle_buffer=shuffle_buffer, done=done, segment=segment, bucket_window=bucket_window)
    counts = b.counts()
    steps = int(b.step.max()) + 1 if len(b.step) else 0
    steps = -(-steps // step_multiple) * step_multiple
    step_samples = np.bincount(b.step, weights=counts, minlength=steps).astype(np.int64).tolist()
    order = b.order
    mixed = table.shard_cache is not None
    plans = []
    for s in range(rank * workers, (rank + 1) * workers):
        lo, hi = np.searchsorted(b.stream, [s, s + 1])
        rows = order[b.members[b.bounds[lo]:b.bounds[hi]]]
        streamed = b.kept[b.stream_bounds[s]:b.stream_bounds[s + 1]]  # positions in stream order: shard runs
        run = np.searchsorted(b.runs, streamed, side="right") - 1
        first = streamed[np.append(True, run[1:] != run[:-1])] if len(run) else streamed
        shard = np.searchsorted(table.shard_start, order[first], side="right") - 1
        plans.append(WorkerPlan(table.keys_of(rows), b.bounds[lo:hi + 1] - b.bounds[lo],
                                table.shard_names.take(pa.array(shard, pa.int64())).to_pylist(),
                                table.cache_of_rows(rows) if mixed else None,
                                table.shard_cache[shard].tolist() if mixed else None))
    return EpochPlan(plans, steps, step_samples)


def trained_positions(table: SampleTable, *, seed: int, epoch: int, layout: dict, steps: int,
                      done: np.ndarray | None = None, segment: int = 0) -> np.ndarray:
    """A bool per position of the epoch order: trained by every rank in the first `steps` steps of a
    segment planned with `layout`, or in `done` (earlier segments)."""
    b = plan_batches(table, seed=seed, epoch=epoch, world_size=layout["world_size"],
                     workers=layout["loader_workers"], batch_size=layout["batch_size"],
                     shuffle_buffer=layout["shuffle_buffer"], done=done, segment=segment)
    out = np.zeros(len(b.order), dtype=bool) if done is None else done.copy()
    trained = np.flatnonzero(b.step < steps)
    out[b.members[_ranges(b.bounds[trained], b.counts()[trained])]] = True
    return out
