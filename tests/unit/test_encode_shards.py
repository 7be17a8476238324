"""Target encodings, sample members, and the shard commit protocol on local disk."""
import numpy as np
import pytest
import torch

from pipeline import storage
from pipeline.cache import shards
from pipeline.cache.reader import FORMAT, CacheError, iter_shard, open_cache
from pipeline.cache.encode import (IMAGE_ENCODINGS, IMAGE_MEMBERS, CorruptSample, decode_members, encode_image,
                                   encode_members, quantize)
from pipeline.storage import Storage


def _sample(key, h=4, w=6, d=32, encoding="float16", seed=0, image_encoding="raw"):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(h, w, d, generator=g)
    image = np.random.default_rng(seed).integers(0, 256, (h * 16, w * 16, 3), dtype=np.uint8)
    enc = {k: v.numpy() for k, v in quantize(target, encoding).items()}
    meta = {"image_size": [h * 16, w * 16], "grid": [h, w]}
    members = encode_members(key, encode_image(image, image_encoding), IMAGE_MEMBERS[image_encoding], enc, meta)
    return members, image, target.numpy()


@pytest.mark.parametrize("image_encoding", IMAGE_ENCODINGS)
@pytest.mark.parametrize("encoding,tol", [("float32", 0), ("float16", 1e-3), ("int8", 1e-2)])
def test_members_round_trip(encoding, tol, image_encoding):
    members, image, target = _sample("k", encoding=encoding, image_encoding=image_encoding)
    assert IMAGE_MEMBERS[image_encoding] in members
    out = decode_members(members)
    assert np.array_equal(out["image"], image) and out["image"].dtype == np.uint8
    assert np.linalg.norm(out["target"] - target) / np.linalg.norm(target) <= tol
    assert out["target"].dtype == np.float32


def test_int8_bytes_and_cosine_for_d512():
    target = torch.randn(64, 128, 512)
    q = quantize(target, "int8")
    per_token = (q["target"].numel() + q["target_scale"].numel() * 4) / (64 * 128)
    deq = q["target"].float() * q["target_scale"]
    cos = torch.nn.functional.cosine_similarity(deq, target, dim=-1)
    assert per_token <= 600 and cos.min() >= 0.999


@pytest.mark.parametrize("image_encoding", IMAGE_ENCODINGS)
@pytest.mark.parametrize("member", ["target.npy", "image"])
def test_corruption_is_detected(image_encoding, member):
    members, _, _ = _sample("k", image_encoding=image_encoding)
    member = IMAGE_MEMBERS[image_encoding] if member == "image" else member
    bad = dict(members)
    t = bytearray(bad[member])
    t[-1] ^= 0xFF
    bad[member] = bytes(t)
    with pytest.raises(CorruptSample, match="checksum"):
        decode_members(bad)
    with pytest.raises(CorruptSample, match="missing"):
        decode_members({k: v for k, v in members.items() if k != IMAGE_MEMBERS[image_encoding]})


def test_a_raw_image_member_that_is_not_rgb_uint8_is_refused():
    from pipeline.codecs import npy_bytes

    members, _, _ = _sample("k")
    members["image.npy"] = npy_bytes(np.zeros((64, 96, 3), dtype=np.float32))
    with pytest.raises(CorruptSample, match="uint8"):
        decode_members(members, verify=False)


def test_npy_members_refuse_pickles():
    members, _, _ = _sample("k")
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    members["target.npy"] = buf.getvalue()
    with pytest.raises(ValueError):
        decode_members(members, verify=False)


def _rows(samples):
    return [{"key": s["__key__"], "source": "x", "view": 0, "height": 64, "width": 96, "grid_h": 4, "grid_w": 6,
             "target_bytes": len(s["target.npy"]), "image_checksum": "i", "target_checksum": "c", "windows": 1}
            for s in samples]


def _new_cache(tmp_path) -> str:
    out = str(tmp_path / "cache")
    shards.write_json(Storage(), storage.join(out, "teacher.json"), {"format": FORMAT})
    shards.create_tables(Storage(), out)
    return out


def test_a_shard_is_committed_by_one_manifest_append(tmp_path):
    out = _new_cache(tmp_path)
    batch = [_sample(f"k{i}", seed=i)[0] for i in range(3)]
    row = shards.commit_shard(Storage(), out, batch, _rows(batch), run="r1")
    assert row["samples"] == 3 and row["shard"] == row["sha256"][:32]  # named by the tar's content
    cache = open_cache(out)
    assert sorted(cache.keys()) == ["k0", "k1", "k2"] and cache.verify() == [] and cache.version == 1
    assert cache.shards.to_pylist() == [{"shard": row["shard"], "tar": f"shards/{row['shard']}.tar", "samples": 3,
                                         "bytes": row["bytes"], "sha256": row["sha256"]}]
    assert [s["key"] for s in iter_shard(cache.shard_urls()[0], Storage())] == ["k0", "k1", "k2"]
    again = shards.commit_shard(Storage(), out, batch, _rows(batch), run="r2")  # a retried writer
    assert again == row  # the same bytes under the same name
    cache = open_cache(out)
    assert sorted(cache.keys()) == ["k0", "k1", "k2"] and cache.version == 2
    assert sorted(set(cache.duplicates.column("key").to_pylist())) == ["k0", "k1", "k2"]  # reported, read once
    assert open_cache(out, version=1).duplicates.num_rows == 0  # a pinned snapshot reads as it was


def test_the_drivers_group_commit_makes_several_written_shards_part_of_the_cache_in_one_append(tmp_path):
    """Writers write tars and hand their rows on; the driver commits whole shards, several an
    append: after `shards_per_commit` of them, after `commit_every_s` (also while no shard arrives),
    and what waits at the end."""
    import time

    from pipeline.cache.job import CacheConfig, GroupCommit
    from pipeline.cache.tasks import _ipc

    out = _new_cache(tmp_path)
    batches = [[_sample(f"k{s}-{i}", seed=3 * s + i)[0] for i in range(3)] for s in range(6)]
    written = [shards.write_shard(Storage(), out, b, _rows(b), run="r") for b in batches]
    assert open_cache(out, require_samples=False).version == 0  # tars written, nothing committed
    group = GroupCommit(CacheConfig(output=out, pretrained=None, shards_per_commit=2, commit_every_s=3600), Storage())
    for rows in (_ipc(written[0]), b"", _ipc(written[1]), _ipc(written[2])):  # b"": a batch of errors only
        group.add(rows)
    cache = open_cache(out)
    assert (cache.version, len(cache), group.commits) == (1, 6, 1)  # shards 0 and 1, together
    assert len(set(cache.manifest.column("committed").to_pylist())) == 1
    group.cfg.commit_every_s = 0.2  # shard 2 waits; no other arrives: committed alone, within a second
    deadline = time.monotonic() + 30
    while group.commits < 2:
        assert time.monotonic() < deadline, "the waiting shard was not committed"
        time.sleep(0.05)
    group.cfg.commit_every_s = 3600
    assert (open_cache(out).version, len(open_cache(out))) == (2, 9)
    group.add(_ipc(written[3]))
    assert open_cache(out).version == 2
    group.close()  # what waits at the end
    cache = open_cache(out)
    assert (cache.version, len(cache), group.commits) == (3, 12, 3) and cache.verify() == []
    # the same check on arrival (its timer stopped, so only the arrival can commit): shard 4 waited
    # longer than commit_every_s when shard 5 arrived: 4 and 5 together
    arrival = GroupCommit(CacheConfig(output=out, pretrained=None, shards_per_commit=64, commit_every_s=3600),
                          Storage())
    arrival.stopped.set()
    arrival.timer.join()
    arrival.add(_ipc(written[4]))
    arrival.cfg.commit_every_s = 0.0
    arrival.add(_ipc(written[5]))
    cache = open_cache(out)
    assert (cache.version, len(cache), arrival.commits) == (4, 18, 1) and cache.verify() == []
    assert cache.shards.num_rows == 6


def test_orphan_tars_are_removed_only_after_the_retention(tmp_path):
    import os
    import time

    out = _new_cache(tmp_path)
    batch = [_sample(f"k{i}", seed=i)[0] for i in range(2)]
    kept = shards.commit_shard(Storage(), out, batch, _rows(batch), run="r")
    orphan = shards.shard_url(out, "deadbeef")  # a writer died between its tar and its commit
    shards._write_tar(Storage(), orphan, [_sample("z", seed=9)[0]])
    assert shards.clean_orphans(Storage(), out, retention_s=3600) == []  # young: a live writer may commit it
    old = time.time() - 7200
    os.utime(storage.local_path(orphan), (old, old))
    os.utime(storage.local_path(shards.shard_url(out, kept["shard"])), (old, old))
    assert shards.clean_orphans(Storage(), out, retention_s=3600) == [orphan]
    assert open_cache(out).verify() == []  # a committed tar is never an orphan, however old


def test_a_live_writers_lease_keeps_the_tars_it_may_still_commit_and_an_expired_one_does_not(tmp_path):
    """A clean-up with no retention at all removes a dead writer's orphan, never a tar written since
    the start of a live writer's lease; the lease is renewed while its job runs and removed at its
    end, and a killed job's lease expires with its ttl, its orphans then removed too."""
    import json
    import os
    import time

    out, store = _new_cache(tmp_path), Storage()

    def age(url, seconds):
        os.utime(storage.local_path(url), (time.time() - seconds,) * 2)

    dead = shards.shard_url(out, "dead")  # from a writer that died before any lease here
    shards._write_tar(store, dead, [_sample("d", seed=1)[0]])
    age(dead, 7200)
    with shards.WriterLease(store, out, "job-a", every_s=0.05, ttl_s=3600) as lease:
        lease.body["started"] -= 100  # a job started 100 s ago (the heartbeat writes this body) ...
        waiting = shards.shard_url(out, "waiting")  # ... and wrote this tar 10 s ago, its commit not made yet
        shards._write_tar(store, waiting, [_sample("w", seed=2)[0]])
        age(waiting, 10)
        renewed = store.modified(lease.url)
        deadline = time.monotonic() + 30
        while shards.live_writers(store, out)[0]["renewed"] <= renewed:  # its heartbeat
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.05)
        (writer,) = shards.live_writers(store, out)
        assert writer["run"] == "job-a" and writer["started"] == lease.body["started"]
        assert shards.clean_orphans(store, out, retention_s=0) == [dead]
        assert shards.clean_orphans(store, out, retention_s=0) == []
    assert shards.live_writers(store, out) == [] and not store.exists(lease.url)  # removed at its end
    age(waiting, 10)
    assert shards.clean_orphans(store, out, retention_s=0) == [waiting]  # its writer is gone

    # a killed job: its lease stays, unrenewed, until its ttl has passed
    killed = shards.WriterLease(store, out, "job-b", every_s=3000, ttl_s=3600).__enter__()
    killed.body["started"] -= 100
    store.write_text(killed.url, json.dumps(killed.body))
    left = shards.shard_url(out, "left")
    shards._write_tar(store, left, [_sample("l", seed=3)[0]])
    age(left, 10)
    assert shards.clean_orphans(store, out, retention_s=0) == []
    age(killed.url, 3601)
    assert shards.clean_orphans(store, out, retention_s=0) == [left]
    assert not store.exists(killed.url)  # the expired lease is removed with its orphans
    killed.stopped.set()
    # a file there that is no lease: taken as a writer started at its date, nothing fails
    store.write_text(storage.join(out, shards.WRITERS, "junk.json"), "not a lease")
    (junk,) = shards.live_writers(store, out)
    assert junk["run"] == "junk.json" and junk["started"] == junk["renewed"]
    assert shards.clean_orphans(store, out, retention_s=0) == []


def test_a_shard_whose_keys_all_came_second_is_not_an_orphan(tmp_path):
    """Racing writers: shard B commits only keys that shard A committed first. Readers read A, yet
    B's rows are committed: its tar is no orphan, and every committed row keeps its tar."""
    import os
    import time

    out = _new_cache(tmp_path)
    a = [_sample(f"k{i}", seed=i)[0] for i in range(3)]
    shards.commit_shard(Storage(), out, a, _rows(a), run="writer-a")
    b = [_sample(f"k{i}", seed=i)[0] for i in range(1, 3)]
    second = shards.commit_shard(Storage(), out, b, _rows(b), run="writer-b")
    old = time.time() - 7200
    for name in os.listdir(tmp_path / "cache" / "shards"):
        os.utime(tmp_path / "cache" / "shards" / name, (old, old))
    assert shards.clean_orphans(Storage(), out, retention_s=3600) == []
    cache = open_cache(out)
    assert second["shard"] in cache.duplicates.column("shard").to_pylist()
    assert second["shard"] not in cache.shards.column("shard").to_pylist()  # read from A
    tars = shards.open_table(Storage(), out).to_pyarrow_table(columns=["tar"]).column("tar").to_pylist()
    assert all(os.path.exists(tmp_path / "cache" / t) for t in tars)


def test_duplicate_keys_across_shards_are_read_once(tmp_path):
    out = _new_cache(tmp_path)
    a = [_sample(f"k{i}", seed=i)[0] for i in range(2)]
    b = [_sample(f"k{i}", seed=i)[0] for i in range(1, 3)]
    shards.commit_shard(Storage(), out, a, _rows(a), run="writer-a")
    shards.commit_shard(Storage(), out, b, _rows(b), run="writer-b")
    cache = open_cache(out)
    assert sorted(cache.keys()) == ["k0", "k1", "k2"]
    assert sorted(s["key"] for s in cache) == ["k0", "k1", "k2"]
    assert sorted(cache.duplicates.column("run").to_pylist()) == ["writer-a", "writer-b"]  # k1, from both


def test_caches_of_the_parquet_manifest_format_are_refused_by_name(tmp_path):
    out = str(tmp_path / "old")
    shards.write_json(Storage(), storage.join(out, "teacher.json"), {"format": "spar-teacher-cache/1"})
    with pytest.raises(CacheError, match="spar-teacher-cache/1.*Delta Lake"):
        open_cache(out)


def test_the_manifest_is_a_delta_table_that_duckdb_queries(tmp_path):
    """The README's query: any Delta reader (deltalake, DuckDB, Polars, Spark) reads the manifest."""
    import duckdb
    from deltalake import DeltaTable

    out = _new_cache(tmp_path)
    for i in range(3):
        batch = [_sample(f"k{i}{j}", seed=3 * i + j)[0] for j in range(2)]
        shards.commit_shard(Storage(), out, batch, _rows(batch), run="r")
    samples = DeltaTable(f"{out}/manifest").to_pyarrow_dataset()  # noqa: F841  (queried by name below)
    rows = duckdb.sql("SELECT shard, count(*) AS n, sum(target_bytes) AS bytes FROM samples GROUP BY shard").fetchall()
    assert len(rows) == 3 and all(n == 2 for _, n, _ in rows)


def test_a_key_set_holds_16_bytes_a_key_and_answers_membership_exactly():
    import pyarrow as pa

    from pipeline.cache.shards import KeySet

    keys = [f"sa_{i}_{i * 7919 % 100003:012x}_v{i % 2}" for i in range(100_000)]
    done = KeySet.of(pa.chunked_array([keys[:40_000], keys[40_000:]]))
    assert len(done) == 100_000 and done.digests.nbytes == 16 * 100_000
    asked = keys[::1000] + [k + "x" for k in keys[::1000]] + ["", "sa_1"]
    assert done.contains(asked).tolist() == [True] * 100 + [False] * 102
    assert keys[5] in done and "nope" not in done and "x" not in KeySet.of(pa.array([], pa.string()))


def test_a_reruns_committed_keys_are_grouped_by_source_tar_so_each_tar_task_gets_only_its_own(tmp_path):
    """The cache job's rerun state: image-source keys in one set, tar members' keys per tar (a tar's
    task is sent its own digests, not every committed key)."""
    import pyarrow as pa

    store, out = Storage(), str(tmp_path / "cache")
    shards.create_tables(store, out)
    rows = [dict(row, key=f"k{i}_v0", source=f"s3://b/sa_{i % 3}.TAR#sa_{i}.jpg" if i < 7 else f"/x/img{i}.jpg",
                 shard="s", tar="shards/s.tar", shard_samples=10, shard_bytes=1, shard_sha256="", run="r",
                 committed=0.0) for i, row in enumerate(_rows([{"__key__": "", "target.npy": b""}] * 10))]
    shards._append(store, out, shards.MANIFEST, pa.Table.from_pylist(rows, schema=shards.SAMPLE_SCHEMA))
    done = shards.committed_keys(store, out)
    assert (len(done), done.version, len(done.keys)) == (10, 1, 3)
    assert [len(done.in_tar(f"s3://b/sa_{t}.TAR")) for t in range(4)] == [3, 2, 2, 0]
    assert "k3_v0" in done.in_tar("s3://b/sa_0.TAR") and "k1_v0" not in done.in_tar("s3://b/sa_0.TAR")
    assert "k8_v0" in done.keys and "k0_v0" not in done.keys
    sent = shards.KeySet.from_bytes(done.in_tar("s3://b/sa_1.TAR").digests.tobytes())
    assert sent.contains(["k1_v0", "k4_v0", "k2_v0"]).tolist() == [True, True, False]
    assert len(shards.committed_keys(store, str(tmp_path / "none"))) == 0
