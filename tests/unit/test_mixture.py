"""Mixtures of caches in the epoch planner: exact draws per cache, every drawn sample once, disjoint
ranks, the single-cache order unchanged, elastic resume, and the loader reading repeated shards."""

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from pipeline.storage import Storage
from pipeline.train.epochs import SampleTable, draw_counts, epoch_order, epoch_runs, plan_batches, plan_epoch, \
    trained_positions
from pipeline.train.loader import make_loader
from tests.unit.test_loader import _table, _write_cache


def _two(a_shards=7, b_shards=3) -> SampleTable:
    """Cache 0: 35 samples in 7 shards, 3 sizes; cache 1: 12 samples in 3 shards, other sizes, and the
    same keys as cache 0's first ones (two caches may share keys)."""
    return SampleTable.concat([_table(a_shards, 5), _table(b_shards, 4, sizes=((48, 48), (64, 96)))])


def _drawn(table: SampleTable, plans) -> Counter:
    """(cache, key) -> times drawn, over every rank's plan."""
    return Counter((c, k) for p in plans for w in p.workers for j in range(len(w))
                   for c, k in zip(w.batch_caches(j), w.batch(j)))


def _plans(table, world, workers, batch=1, epoch=0, **kw):
    return [plan_epoch(table, seed=5, epoch=epoch, rank=r, world_size=world, workers=workers, batch_size=batch,
                       shuffle_buffer=4, **kw) for r in range(world)]


def test_draw_counts_split_an_epoch_in_proportion_exactly():
    assert draw_counts([35, 12]) == [35, 12]  # default: every sample of every cache once
    assert draw_counts([35, 12], [1, 1]) == [24, 23]  # 47 split evenly; the remainder to the first
    assert draw_counts([35, 12], [3, 1], 40) == [30, 10]
    assert draw_counts([35, 12], [0.7, 0.3], 10) == [7, 3]
    assert sum(draw_counts([5, 7, 11], [1, 1, 1], 100)) == 100
    with pytest.raises(ValueError, match="one weight >= 0 per cache"):
        draw_counts([35, 12], [1])
    with pytest.raises(ValueError, match="needs mix"):
        draw_counts([35, 12], None, 10)
    with pytest.raises(ValueError, match="no samples"):
        draw_counts([35, 0], [1, 1])


def test_one_cache_and_a_default_mixture_keep_the_single_cache_order():
    """A mixture of one is the cache itself; drawing every sample once is the undrawn order (a
    checkpoint of a single-cache run resumes on this planner)."""
    one = _table()
    assert SampleTable.concat([one]) is one
    assert np.array_equal(epoch_order(one.with_draw([35]), seed=1, epoch=2), epoch_order(one, seed=1, epoch=2))
    mixed = _two()
    assert np.array_equal(epoch_order(mixed.with_draw([35, 12]), seed=1, epoch=2), epoch_order(mixed, seed=1, epoch=2))
    assert sorted(epoch_order(mixed, seed=1, epoch=2).tolist()) == list(range(47))


@pytest.mark.parametrize("draw", [[20, 27], [35, 12], [50, 30], [3, 0]])
@pytest.mark.parametrize("world,workers,batch", [(1, 1, 1), (2, 2, 2), (3, 1, 3)])
def test_an_epoch_draws_each_cache_at_its_count_every_drawn_sample_once(draw, world, workers, batch):
    """Cache 0 (35 samples) and cache 1 (12) subsampled, whole, repeated; over the ranks' plans each
    cache is drawn exactly its count; a repeated cache has every sample floor or ceil of its repeat
    count times, a subsampled one distinct samples; batches hold one image size."""
    table = _two().with_draw(draw)
    plans = _plans(table, world, workers, batch)
    drawn = _drawn(table, plans)
    sizes = table.cache_sizes().tolist()
    for c, (n, size) in enumerate(zip(draw, sizes)):
        times = [t for (cc, _), t in drawn.items() if cc == c]
        assert sum(times) == n  # exact
        assert set(times) <= {n // size, -(-n // size)} and (len(times) == size or n < size)
    per_rank = [sum(len(w.batch(j)) for w in p.workers for j in range(len(w))) for p in plans]
    assert sum(per_rank) == sum(draw) and max(per_rank) - min(per_rank) <= 1
    size_of = {}
    for c, t in enumerate([_table(7, 5), _table(3, 4, sizes=((48, 48), (64, 96)))]):
        size_of |= {(c, k): tuple(t.sizes[s]) for k, s in zip(t.keys_of(np.arange(len(t))).to_pylist(), t.size)}
    for p in plans:
        assert p.step_samples == plans[0].step_samples
        for w in p.workers:
            for j in range(len(w)):
                assert len({size_of[i] for i in zip(w.batch_caches(j), w.batch(j))}) == 1


def test_every_position_is_in_one_batch_and_a_repeat_is_its_own_shard_run():
    table = _two().with_draw([10, 30])  # cache 1 (12 samples) drawn 2.5 times
    order, runs = epoch_runs(table, seed=5, epoch=0)
    assert len(order) == 40 and runs[-1] == 40
    b = plan_batches(table, seed=5, epoch=0, world_size=2, workers=2, batch_size=2, shuffle_buffer=4)
    assert sorted(b.members.tolist()) == list(range(40))
    shard = np.searchsorted(table.shard_start, order[runs[:-1]], side="right") - 1
    assert Counter(table.shard_cache[shard].tolist())[1] > table.num_shards - 7  # some cache-1 shards run twice
    for lo, hi in zip(runs[:-1], runs[1:]):  # a run is one shard's samples, in key (= row) order, each once
        rows = order[lo:hi]
        assert len(set(np.searchsorted(table.shard_start, rows, side="right") - 1)) == 1
        assert (np.diff(rows) > 0).all()


def test_the_draw_depends_on_seed_and_epoch_only():
    table = _two().with_draw([20, 27])

    def chosen(seed, epoch):
        return sorted(epoch_order(table, seed=seed, epoch=epoch).tolist())

    assert chosen(0, 0) == chosen(0, 0)
    assert chosen(0, 0) != chosen(0, 1) and chosen(0, 0) != chosen(1, 0)  # another subsample each epoch


@pytest.mark.parametrize("old,new,steps", [((2, 1), (3, 2), 3), ((3, 2), (1, 1), 2)])
def test_a_mixture_resumed_on_another_layout_draws_the_rest_once(old, new, steps):
    table = _two().with_draw([20, 30])
    layout = {"world_size": old[0], "loader_workers": old[1], "batch_size": 2, "shuffle_buffer": 4}
    done = trained_positions(table, seed=5, epoch=1, layout=layout, steps=steps)
    assert 0 < done.sum() < 50 and len(done) == table.epoch_length
    first = _plans(table, *old, batch=2, epoch=1)
    rest = _plans(table, *new, batch=1, epoch=1, done=done, segment=1)
    trained = Counter()
    for p in first:
        for w, j in p.order()[:steps]:
            trained.update(zip(p.workers[w].batch_caches(j), p.workers[w].batch(j)))
    assert trained + _drawn(table, rest) == _drawn(table, first)  # the same multiset of draws


def test_the_loader_reads_a_repeated_cache_from_each_of_its_shard_runs(tmp_path):
    """Two caches whose keys coincide, cache 1 drawn 2.5 times: every batch as planned, each drawn
    sample read from its own cache."""
    a, ta = _write_cache(tmp_path / "a", n=4)
    b, tb = _write_cache(tmp_path / "b", n=10)
    table = SampleTable.concat([ta, tb]).with_draw([3, 25])
    plans = _plans(table, 1, 2, batch=2)
    batches = list(make_loader([a, b], Storage(), plans[0], prefetch=2))
    assert [(x["worker"], x["index"]) for x in batches] == plans[0].order()
    got = Counter((c, k) for x in batches for c, k in zip(x["caches"], x["keys"]))
    assert got == _drawn(table, plans) and sum(got.values()) == 28
    for x in batches[:4]:
        assert len(x["keys"]) == len(x["caches"]) == x["image"].shape[0]
    # a resume at a later step continues the same sequence
    rest = list(make_loader([a, b], Storage(), plans[0], 5, prefetch=2))
    assert [(r["keys"], r["caches"]) for r in rest] == [(x["keys"], x["caches"]) for x in batches[5:]]


def test_a_resumed_runs_metrics_csv_of_an_earlier_version_gains_the_cache_column(tmp_path):
    """A run resumed from a version whose metrics.csv had no `cache` column: the file is rewritten once
    with today's header, its rows kept, and new per-cache rows line up."""
    import csv

    from pipeline.train.metrics import Metrics

    run = tmp_path / "run"
    run.mkdir()
    old = Metrics.COLUMNS[:-1]
    (run / "metrics.csv").write_text(",".join(old) + "\n" + "epoch,5,0,0.5" + "," * (len(old) - 4) + "\n")
    m = Metrics(str(run), Storage(), enabled=True)
    m.log({"kind": "epoch", "step": 10, "epoch": 1, "cache": 1, "samples": 4})
    m.sync()
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(Metrics.COLUMNS)
    assert (rows[0]["step"], rows[0]["loss"], rows[0]["cache"]) == ("5", "0.5", "")
    assert (rows[1]["cache"], rows[1]["samples"]) == ("1", "4")
