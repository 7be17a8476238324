"""The epoch plan: disjoint, complete, balanced, seeded; batches of one size; exact resume; at scale."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.cache import shards
from pipeline.cache.encode import encode_members, quantize
from pipeline.codecs import png_bytes
from pipeline.train.checkpoint import pack_positions, unpack_positions
from pipeline.train.epochs import SampleTable, epoch_order, plan_epoch, trained_positions
from pipeline.train.loader import make_loader
from pipeline.storage import Storage

SIZES = ((64, 96), (96, 64), (80, 80))


def _table(n_shards=7, per_shard=5, sizes=SIZES) -> SampleTable:
    n = n_shards * per_shard
    size = [sizes[(i // per_shard + i % per_shard) % len(sizes)] for i in range(n)]
    return SampleTable.from_table(pa.table({
        "key": [f"k{i // per_shard}-{i % per_shard}" for i in range(n)],
        "shard": [f"shard-{i // per_shard:05d}" for i in range(n)],
        "height": pa.array([h for h, _ in size], pa.int32()), "width": pa.array([w for _, w in size], pa.int32())}))


def _size_of(table: SampleTable) -> dict[str, tuple[int, int]]:
    return {k: tuple(table.sizes[c]) for k, c in zip(table.keys_of(np.arange(len(table))).to_pylist(), table.size)}


def _keys(plans) -> list[str]:
    return [k for p in plans for b in p.ordered_batches() for k in b]


def _check_plans(table, plans, batch):
    """Every sample once, balanced, one size per batch; every rank agrees on the steps and on how
    many real samples each step has (what the step weights assume)."""
    size_of = _size_of(table)
    assert sorted(_keys(plans)) == sorted(size_of)  # all, once
    per_rank = [sum(len(b) for b in p.ordered_batches()) for p in plans]
    assert max(per_rank) - min(per_rank) <= 1  # balanced samples
    assert len({p.steps for p in plans}) == 1 and all(p.steps >= p.real_steps for p in plans)
    assert all(p.step_samples == plans[0].step_samples for p in plans)
    counted = np.zeros(plans[0].steps, dtype=np.int64)
    for p in plans:
        for step, b in enumerate(p.ordered_batches()):
            assert 1 <= len(b) <= batch and len({size_of[k] for k in b}) == 1  # one size per batch
            counted[step] += len(b)
    assert counted.tolist() == plans[0].step_samples


@pytest.mark.parametrize("world,workers,batch", [(1, 1, 1), (2, 2, 1), (3, 2, 2), (4, 1, 3), (5, 3, 1)])
def test_every_sample_once_per_epoch_disjoint_across_ranks(world, workers, batch):
    table = _table()
    plans = [plan_epoch(table, seed=0, epoch=1, rank=r, world_size=world, workers=workers, batch_size=batch,
                        shuffle_buffer=4) for r in range(world)]
    _check_plans(table, plans, batch)


def test_the_plan_at_scale_100k_samples_on_64_ranks():
    """The vectorised plan of 100K samples (3 image sizes) on 64 ranks x 4 loader processes, batches
    of 8: every sample once, one size per batch, step counts that every rank agrees on; and the
    elastic resume of the same epoch onto 48 ranks x 2 trains exactly the rest."""
    table = _table(n_shards=3125, per_shard=32)
    kw = dict(seed=5, epoch=3)
    plans = [plan_epoch(table, **kw, rank=r, world_size=64, workers=4, batch_size=8, shuffle_buffer=16,
                        step_multiple=2) for r in range(64)]
    _check_plans(table, plans, 8)
    assert plans[0].steps % 2 == 0
    assert {len(w.shards) for p in plans for w in p.workers} <= {13, 14}  # ~390 samples: 13 shards, or one more
    layout = {"world_size": 64, "loader_workers": 4, "batch_size": 8, "shuffle_buffer": 16}
    done = trained_positions(table, **kw, layout=layout, steps=20)
    order = epoch_order(table, **kw)
    first = table.keys_of(order[done]).to_pylist()
    trained = [k for p in plans for b in p.ordered_batches()[:20] for k in b]
    assert sorted(first) == sorted(trained)
    rest = [plan_epoch(table, **kw, rank=r, world_size=48, workers=2, batch_size=8, shuffle_buffer=16, done=done,
                       segment=1) for r in range(48)]
    assert sorted(first + _keys(rest)) == sorted(table.keys_of(np.arange(len(table))).to_pylist())


def _layout(world, workers, batch=1):
    return {"world_size": world, "loader_workers": workers, "batch_size": batch, "shuffle_buffer": 4}


@pytest.mark.parametrize("old,new,steps", [((2, 1), (3, 2), 3), ((3, 2), (2, 1), 1), ((2, 2), (2, 3), 5),
                                           ((4, 1), (1, 1), 2)])
def test_a_segment_on_a_new_layout_trains_the_rest_of_the_epoch_once(old, new, steps):
    """Steps done on one layout, the rest re-planned on another (twice): every sample once."""
    table, kw = _table(), dict(seed=0, epoch=2)
    order = table.keys_of(epoch_order(table, **kw)).to_pylist()
    done = trained_positions(table, **kw, layout=_layout(*old), steps=steps)
    first = [order[i] for i in np.flatnonzero(done)]
    assert 0 < len(first) < len(order)
    rest = [plan_epoch(table, **kw, rank=r, world_size=new[0], workers=new[1], batch_size=1, shuffle_buffer=4,
                       done=done, segment=1) for r in range(new[0])]
    assert sorted(first + _keys(rest)) == sorted(order)
    # a second change of layout, one step into the new segment
    done2 = trained_positions(table, **kw, layout=_layout(*new), steps=1, done=done, segment=1)
    assert done2.sum() == done.sum() + sum(len(p.ordered_batches()[0]) for p in rest if p.ordered_batches())
    assert (unpack_positions(pack_positions(done2), len(order)) == done2).all() and unpack_positions("", 3) is None


def test_step_samples_count_every_rank_and_steps_fill_accumulation_windows():
    table = SampleTable.from_table(pa.table({"key": [f"k{i}" for i in range(5)], "shard": ["a"] * 5,
                                             "height": pa.array([64] * 5, pa.int32()),
                                             "width": pa.array([64] * 5, pa.int32())}))
    plans = [plan_epoch(table, seed=0, epoch=0, rank=r, world_size=2, workers=1, batch_size=1, shuffle_buffer=1,
                        step_multiple=2) for r in range(2)]
    assert [p.real_steps for p in plans] == [3, 2]
    assert plans[0].steps == 4 and plans[0].step_samples == [2, 2, 1, 0] == plans[1].step_samples
    assert plans[0].window_samples(2, 2) == 1 and plans[0].window_samples(1, 2) == 4


def test_order_depends_on_seed_and_epoch_only():
    table = _table()

    def keys(seed, epoch):
        return _keys([plan_epoch(table, seed=seed, epoch=epoch, rank=0, world_size=2, workers=2, batch_size=1,
                                 shuffle_buffer=4)])

    assert keys(0, 0) == keys(0, 0)
    assert keys(0, 0) != keys(0, 1) and keys(0, 0) != keys(1, 0)


def test_a_batch_holds_samples_of_one_bucket_window_of_its_stream():
    """Sizes that rarely repeat: batches never gather samples from further apart in a loader
    process's stream than one window (what bounds the samples a loader process holds)."""
    n = 200
    table = SampleTable.from_table(pa.table({
        "key": [f"k{i:03d}" for i in range(n)], "shard": ["s"] * n,
        "height": pa.array([16 * (i % 50 + 1) for i in range(n)], pa.int32()),
        "width": pa.array([64] * n, pa.int32())}))
    plan = plan_epoch(table, seed=0, epoch=0, rank=0, world_size=1, workers=1, batch_size=4, shuffle_buffer=1,
                      bucket_window=8)
    position = {k: i for i, k in enumerate(table.keys_of(np.arange(len(table))).to_pylist())}  # one shard, no shuffle: key order
    assert sorted(_keys([plan])) == sorted(position)
    for b in plan.ordered_batches():
        spread = [position[k] for k in b]
        assert len({p // 8 for p in spread}) == 1


def _write_cache(tmp_path, n=10):
    out = str(tmp_path / "cache")
    rows, members = [], []
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = (4, 6) if i % 2 else (6, 4)
        target = {k: v.numpy() for k, v in quantize(torch.randn(h, w, 8), "float16").items()}
        img = rng.integers(0, 256, (h * 16, w * 16, 3), dtype=np.uint8)
        members.append(encode_members(f"s{i:02d}", png_bytes(img), "png", target,
                                      {"image_size": [h * 16, w * 16], "grid": [h, w]}))
        rows.append({"key": f"s{i:02d}", "source": "x", "view": 0, "height": h * 16, "width": w * 16,
                     "grid_h": h, "grid_w": w, "target_bytes": 0, "target_checksum": "", "windows": 1})
    shards.create_tables(Storage(), out)
    for a in range(0, n, 3):
        shards.commit_shard(Storage(), out, members[a:a + 3], rows[a:a + 3], run="test")
    samples, _, _ = shards.read_manifest(Storage(), out, columns=shards.SAMPLE_COLUMNS)
    return out, SampleTable.from_table(samples)


def test_loader_yields_the_plan_in_order_and_resumes_at_any_step(tmp_path):
    out, table = _write_cache(tmp_path)
    plan = plan_epoch(table, seed=3, epoch=0, rank=0, world_size=1, workers=2, batch_size=2, shuffle_buffer=3)
    full = list(make_loader(out, Storage(), plan, prefetch=2))
    assert sorted(k for b in full for k in b["keys"]) == [f"s{i:02d}" for i in range(10)]
    assert [(b["worker"], b["index"]) for b in full] == plan.order()  # the order the step weights assume
    for b in full:
        assert b["image"].dtype == torch.uint8 and b["target"].dtype == torch.float16
        assert b["image"].shape[1:3] == (b["target"].shape[1] * 16, b["target"].shape[2] * 16)
    for start in range(len(full) + 1):  # a resume at any step continues the same sequence
        rest = list(make_loader(out, Storage(), plan, start, prefetch=2))
        assert [b["keys"] for b in rest] == [b["keys"] for b in full[start:]], start


def test_a_shard_read_for_some_samples_leaves_the_others_unread(tmp_path):
    """A rank or loader process that needs a few samples of a shard (the ends of its range, a resumed
    epoch, a held-out split) reads and buffers only theirs."""
    import glob

    from pipeline.cache.reader import iter_raw_shard

    out, _ = _write_cache(tmp_path, n=3)
    tar = sorted(glob.glob(f"{out}/shards/**/*.tar", recursive=True))[0]
    whole = list(iter_raw_shard(tar, Storage()))
    assert [r["__key__"] for r in whole] == ["s00", "s01", "s02"]

    class Counted:  # the shard file, counting the member bytes read into buffers
        def __init__(self, f, storage):
            self.f, self.storage = f, storage

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def readinto(self, b):
            n = self.f.readinto(b)
            self.storage.read += n
            return n

    class CountingStorage(Storage):
        read = 0

        def open(self, url, mode="rb", **kwargs):
            return Counted(super().open(url, mode, **kwargs), self)

    store, buffers = CountingStorage(), []
    some = list(iter_raw_shard(tar, store, lambda n: buffers.append(n) or bytearray(n), keep={"s01"}.__contains__))
    assert [r["__key__"] for r in some] == ["s01"]
    members = {k: bytes(v) for k, v in whole[1].items() if not k.startswith("__")}
    assert {k: bytes(v) for k, v in some[0].items() if not k.startswith("__")} == members
    member_bytes = sum(map(len, members.values()))
    assert sum(buffers) == member_bytes and store.read == member_bytes


def test_metrics_csv_has_one_header_whatever_row_comes_first(tmp_path):
    import csv

    from pipeline.train.metrics import Metrics

    m = Metrics(str(tmp_path / "run"), Storage(), enabled=True)
    m.log({"kind": "epoch", "step": 3, "epoch": 0, "loss": 0.5})  # an epoch row before any step row
    m.log({"kind": "step", "step": 4, "epoch": 1, "loss": 0.25, "samples_per_s": 2.0, "tokens_per_s": 400.0,
           "data_wait_share": 0.01, "lr": 2e-5})
    m.sync()
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["kind"] for r in rows] == ["epoch", "step"]
    assert rows[0]["samples_per_s"] == "" and float(rows[1]["samples_per_s"]) == 2.0
    assert float(rows[1]["data_wait_share"]) == 0.01


def test_held_out_split_is_stable_keeps_views_together_and_is_never_empty_or_everything():
    from pipeline.train.validation import held_out, source_of

    keys = [f"img{i:04d}_{'ab'[i % 2]}_v{v}" for i in range(400) for v in range(3)]
    held = held_out(keys, 0.05)
    assert held == held_out(list(reversed(keys)), 0.05)  # a function of the keys only
    assert 0.02 < len(held) / len(keys) < 0.09
    sources = {source_of(k) for k in held}
    assert held == {k for k in keys if source_of(k) in sources}  # every view of a held-out image
    assert len(held_out(keys[:6], 0.01)) == 3  # a two-image cache still validates on one image (its 3 views)
    assert held_out(keys, 0) == set()
    with pytest.raises(ValueError, match="nothing is left to train on"):
        held_out(keys[:3], 0.99)


def test_loss_curve_shows_a_run_of_one_logged_step(tmp_path):
    from PIL import Image

    from pipeline.train.metrics import Metrics

    m = Metrics(str(tmp_path / "run"), Storage(), enabled=True)
    m.log({"kind": "val", "step": 0, "epoch": 0, "val_mse": 0.5, "baseline_mse": 0.5, "val_ratio": 1.0, "samples": 2})
    m.log({"kind": "step", "step": 1, "epoch": 0, "loss": 0.4})
    m.log({"kind": "val", "step": 1, "epoch": 0, "val_mse": 0.3, "baseline_mse": 0.5, "val_ratio": 0.6, "samples": 2})
    m.plot()
    image = np.asarray(Image.open(tmp_path / "run" / "loss_curve.png").convert("L"))
    assert image.shape[0] > 300 and image.std() > 10


def test_the_held_out_set_is_capped_at_the_images_of_lowest_hash():
    """`val_max_images`: a large cache holds out a bounded set, a subset of the uncapped one, all
    views of each image together; the split is the same however the keys are ordered or chunked."""
    import pyarrow as pa

    from pipeline.train.validation import _unit, held_out, source_of, split_manifest

    keys = [f"img{i:05d}_{i % 7}_v{v}" for i in range(5000) for v in range(2)]
    uncapped, capped = held_out(keys, 0.02), held_out(keys, 0.02, max_images=10)
    assert len({source_of(k) for k in uncapped}) > 50 and len(capped) == 20 and capped < uncapped
    lowest = sorted({source_of(k) for k in keys}, key=_unit)[:10]
    assert {source_of(k) for k in capped} == set(lowest)
    table = pa.table({"key": pa.chunked_array([keys[:3333], keys[3333:]]), "shard": ["s"] * len(keys)})
    train, held = split_manifest(table, 0.02, max_images=10)
    assert set(held.column("key").to_pylist()) == capped and train.num_rows + held.num_rows == len(keys)


def test_a_sample_table_shares_the_manifests_key_chunks_and_takes_keys_chunk_by_chunk():
    keys = [f"k{i:03d}" for i in range(300)]
    rows = pa.table({"key": pa.chunked_array([keys[:100], keys[100:101], keys[101:]]),
                     "shard": [f"s{i % 7}" for i in range(300)], "height": [224] * 300, "width": [224] * 300})
    table = SampleTable.from_table(rows)
    assert table.source_keys.num_chunks == 3  # the manifest's keys, not a copy
    assert table.source_keys.chunk(2).buffers()[2].address == rows.column("key").chunk(2).buffers()[2].address
    flat = SampleTable.from_table(rows.combine_chunks())
    wanted = np.random.default_rng(0).permutation(300)[:120]
    assert table.keys_of(wanted).to_pylist() == flat.keys_of(wanted).to_pylist()
    assert table.keys_of(np.arange(300)).to_pylist() == sorted(keys, key=lambda k: (f"s{int(k[1:]) % 7}", k))
    assert table.keys_of(np.array([], np.int64)).to_pylist() == []
