"""The cache job end to end on a real local Ray cluster, on local disk and on a loopback S3 server."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

import spar
from jobs import cache_teacher
from pipeline import open_cache, storage
from pipeline.cache.augment import AugmentConfig, augment
from pipeline.cache.reader import CacheError, shard_url
from pipeline.cache.sources import make_key
from pipeline.codecs import decode_image
from pipeline.storage import Storage
from tests.images import bad_inputs, converted_images, good_images
from tests.integration.conftest import put_files

TINY = ["backbone=maskclip-test", "augment.scale=[224,160]", "augment.min_side=64", "shard_size=3",
        "teacher.batch_images=2"]
TOLERANCE = {"float32": 1e-6, "float16": 2e-3, "int8": 2e-2}  # relative L2 error of the stored target


def run_job(*args: str) -> dict:
    return cache_teacher.main([*TINY, *args])


def recompute(bb, sample, stride=24):
    x = bb.normalize(torch.from_numpy(sample["image"].copy()))
    with torch.no_grad():
        return spar.sliding_window_features(bb, x, stride=stride)[0].numpy()


@pytest.mark.parametrize("encoding", ["float16", "int8", "float32"])
def test_round_trip(ray_cluster, storage_root, encoding):
    src, out = storage.join(storage_root, "images"), storage.join(storage_root, "cache")
    files = good_images(5)
    put_files(src, files)
    summary = run_job(f"source={src}", f"output={out}", "views=2", f"encoding={encoding}")
    cache = open_cache(out)
    assert summary["computed"] == len(cache) == 5 * 2 and summary["failed"] == 0
    assert cache.fingerprint["encoding"] == encoding and cache.fingerprint["backbone"] == "maskclip-test"
    bb = spar.load_backbone("maskclip-test", pretrained=None)
    manifest = {r["key"]: r for r in cache.manifest.to_pylist()}
    aug = AugmentConfig(scale=[224, 160], min_side=64)
    seen = set()
    for sample in cache:
        key, meta, target = sample["key"], sample["meta"], sample["target"]
        seen.add(key)
        assert target.dtype == np.float32 and target.shape == (*meta["grid"], 32)
        ref = recompute(bb, sample)
        assert np.linalg.norm(target - ref) / np.linalg.norm(ref) <= TOLERANCE[encoding]
        row = manifest[key]
        assert [row["grid_h"], row["grid_w"]] == meta["grid"] and [row["height"], row["width"]] == meta["image_size"]
        assert row["target_checksum"] == meta["target_checksum"] and row["source"] == meta["source"]
        # the stored pixels are exactly the augmented view of the source
        name = meta["source"].rsplit("/", 1)[1]
        decoded = decode_image(files[name], max_pixels=10**8)
        view, plan = augment(decoded, 0, meta["source_key"], meta["view"], aug)
        assert plan == meta["augment"] and np.array_equal(view, sample["image"])
        assert meta["source_key"] == make_key(meta["source"]) and key == f"{meta['source_key']}_v{meta['view']}"
    assert seen == set(manifest) and len(seen) == 10
    assert sum(cache.shards.column("samples").to_pylist()) == 10 and cache.verify() == []


def test_bad_inputs_are_recorded_or_converted(ray_cluster, storage_root):
    src, out = storage.join(storage_root, "images"), storage.join(storage_root, "cache")
    good, converted, bad = good_images(3), converted_images(), bad_inputs()
    put_files(src, {**good, **converted, **{k: v for k, (v, _) in bad.items()}})
    summary = run_job(f"source={src}", f"output={out}", "max_pixels=2000000", "max_failed_fraction=0.5",
                      "min_source_side=16", "max_aspect=8")
    cache = open_cache(out)
    assert summary["failed"] == len(bad) and len(cache) == len(good) + len(converted)
    errors = {r["source"].rsplit("/", 1)[1]: r["reason"] for r in cache.errors.to_pylist()}
    assert set(errors) == set(bad)
    for name, (_, reason) in bad.items():
        assert reason in errors[name], (name, errors[name])
    for sample in cache:
        assert sample["image"].dtype == np.uint8 and sample["image"].shape[2] == 3


def test_too_many_failures_exit_non_zero_but_keep_the_good(ray_cluster, tmp_path):
    src, out = tmp_path / "images", str(tmp_path / "cache")
    put_files(str(src), {**good_images(2), "zero.jpg": b"", "text.png": b"hello"})
    with pytest.raises(SystemExit) as exit_info:
        run_job(f"source={src}", f"output={out}", "max_failed_fraction=0.25")
    assert exit_info.value.code not in (0, None)
    assert len(open_cache(out)) == 2 and open_cache(out).errors.num_rows == 2


def test_fingerprint_mismatch_is_refused_and_nothing_is_lost(ray_cluster, storage_root):
    src, out = storage.join(storage_root, "images"), storage.join(storage_root, "cache")
    put_files(src, good_images(2))
    run_job(f"source={src}", f"output={out}")
    before = {u: Storage().read_bytes(u) for u in Storage().list_files(out)}
    with pytest.raises(SystemExit):
        run_job(f"source={src}", f"output={out}", "stride=32")
    with pytest.raises(SystemExit):
        run_job(f"source={src}", f"output={out}", "encoding=int8")
    after = {u: Storage().read_bytes(u) for u in Storage().list_files(out)}
    assert before == after


def test_extend_and_resume_compute_only_new_samples(ray_cluster, storage_root):
    src, out = storage.join(storage_root, "images"), storage.join(storage_root, "cache")
    put_files(src, good_images(6))
    first = run_job(f"source={src}", f"output={out}", "limit=4")
    shards_before = {u: Storage().read_bytes(u) for u in Storage().list_files(storage.join(out, "shards"))}
    again = run_job(f"source={src}", f"output={out}", "limit=4")
    extended = run_job(f"source={src}", f"output={out}")
    assert (first["computed"], again["computed"], extended["computed"]) == (4, 0, 2)
    assert extended["already_committed"] == 4 and len(open_cache(out)) == 6
    for url, data in shards_before.items():
        assert Storage().read_bytes(url) == data  # committed shards were not rewritten
    more_views = run_job(f"source={src}", f"output={out}", "views=2")
    assert more_views["computed"] == 6 and len(open_cache(out)) == 12


def test_list_sources(ray_cluster, storage_root):
    import pyarrow as pa

    src, out = storage.join(storage_root, "images"), storage.join(storage_root, "cache")
    files = good_images(4)
    put_files(src, files)
    names = sorted(files)
    Storage().write_text(storage.join(storage_root, "list.txt"), "# two images\n" + "\n".join(f"images/{n}" for n in names[:2]))
    run_job(f"source={storage.join(storage_root, 'list.txt')}", f"output={out}")
    assert len(open_cache(out)) == 2
    table = pa.table({"uri": [storage.join(src, n) for n in names]})
    with Storage().open(storage.join(storage_root, "list.parquet"), "wb") as f:
        pq.write_table(table, f)
    summary = run_job(f"source={storage.join(storage_root, 'list.parquet')}", f"output={out}")
    assert summary["computed"] == 2 and len(open_cache(out)) == 4  # same URIs -> same keys


def test_webdataset_tar_source(ray_cluster, storage_root):
    import webdataset as wds

    src, out = storage.join(storage_root, "tars"), storage.join(storage_root, "cache")
    files = list(good_images(5).items())
    for t in range(2):
        with Storage().open(storage.join(src, f"part-{t:03d}.tar"), "wb") as f, wds.TarWriter(f) as tw:
            for name, data in files[t::2]:
                tw.write({"__key__": f"sa_{name.split('.')[0]}", name.split(".")[1]: data, "json": b"{}"})
    # A third tar: a good member, an empty one, then cut off in the middle of a third member.
    buf = io.BytesIO()
    with wds.TarWriter(buf) as tw:
        for key, data in [("sa_ok", files[0][1]), ("sa_empty", b""), ("sa_cut", files[1][1])]:
            tw.write({"__key__": key, "png": data})
    cut = next(m for m in tarfile.open(fileobj=io.BytesIO(buf.getvalue())) if m.name == "sa_cut.png")
    Storage().write_bytes(storage.join(src, "part-002.tar"), buf.getvalue()[: cut.offset_data + cut.size // 2])
    summary = run_job(f"source={src}", f"output={out}", "max_failed_fraction=0.5")
    cache = open_cache(out)
    assert summary["computed"] == len(cache) == 6 and summary["failed"] == 2
    assert all("#sa_" in s for s in cache.manifest.column("source").to_pylist())
    reasons = dict(zip(cache.errors.column("source").to_pylist(), cache.errors.column("reason").to_pylist()))
    assert "empty" in reasons[storage.join(src, "part-002.tar") + "#sa_empty.png"]
    assert reasons[storage.join(src, "part-002.tar")].startswith("unreadable tar: ReadError")
    again = run_job(f"source={src}", f"output={out}", "max_failed_fraction=1")  # only the failures are retried
    assert (again["computed"], again["failed"], len(open_cache(out))) == (0, 2, 6)


def _sa1b_tar(members: list[str], images: list[bytes]) -> bytes:
    """An SA-1B-like tar: ``sa_<i>.jpg`` + ``sa_<i>.json`` per image, in the given member order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in zip(members, images):
            for member, payload in ((f"{name}.jpg", data), (f"{name}.json", b'{"annotations": []}')):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_sa1b_tars_with_limit_take_the_first_images_in_tar_order(ray_cluster, storage_root):
    """SA-1B as it ships: ``limit=N`` caches the first N images, tars in natural order and members in
    tar order (not sorted), and a larger limit later adds exactly the next ones."""
    src, out = storage.join(storage_root, "sa1b"), storage.join(storage_root, "cache")
    images = list(good_images(9).values())
    layout = {"sa_000000.tar": ["sa_1", "sa_2", "sa_3"], "sa_000001.tar": ["sa_10", "sa_4", "sa_5"],
              "sa_000002.tar": ["sa_6", "sa_7", "sa_8"]}
    for t, (tar, names) in enumerate(layout.items()):
        put_files(src, {tar: _sa1b_tar(names, images[3 * t:3 * t + 3])})
    order = [make_key(f"{storage.join(src, tar)}#{n}.jpg") for tar, names in layout.items() for n in names]
    first = run_job(f"source={src}/", f"output={out}", "limit=5")
    assert (first["source_images"], first["computed"], first["failed"]) == (5, 5, 0)
    assert sorted(k.rsplit("_v", 1)[0] for k in open_cache(out).keys()) == sorted(order[:5])
    again = run_job(f"source={src}/", f"output={out}", "limit=5")
    assert again["computed"] == 0
    more = run_job(f"source={src}/", f"output={out}", "limit=8")
    assert (more["computed"], more["committed_total"]) == (3, 8)
    assert sorted(k.rsplit("_v", 1)[0] for k in open_cache(out).keys()) == sorted(order[:8])


def test_builtin_sample_source_default_settings(ray_cluster, tmp_path):
    """The README's first command: builtin samples, default augmentation, tiny model."""
    summary = cache_teacher.main(["backbone=maskclip-test", f"output={tmp_path / 'cache'}"])
    cache = open_cache(str(tmp_path / "cache"))
    assert summary["failed"] == 0 and len(cache) == summary["computed"] >= 6
    for row in cache.manifest.to_pylist():
        assert min(row["height"], row["width"]) >= 512 and max(row["height"], row["width"]) <= 2048
    assert Storage().exists(str(tmp_path / "cache" / "config.yaml"))


def test_open_cache_errors(tmp_path):
    with pytest.raises(CacheError, match="not a teacher cache"):
        open_cache(str(tmp_path / "nothing"))


def test_a_local_output_that_other_nodes_cannot_see_is_refused_before_any_work(ray_cluster, tmp_path, monkeypatch,
                                                                              caplog):
    """On a multi-node cluster a local path would scatter the cache over the nodes' own disks."""
    import pipeline.ray_utils

    seen = []
    monkeypatch.setattr(pipeline.ray_utils, "nodes_missing", lambda path: seen.append(path) or ["10.0.0.7/0a1b2c3d"])
    src = str(tmp_path / "images")
    put_files(src, good_images(2))
    with pytest.raises(SystemExit) as exit_info:
        run_job(f"source={src}", f"output={tmp_path / 'cache'}")
    assert exit_info.value.code == 2 and seen == [str(tmp_path / "cache" / "teacher.json")]
    assert "use shared storage" in caplog.text and "10.0.0.7" in caplog.text
    assert not (tmp_path / "cache" / "shards").exists()


def test_raw_and_png_caches_hold_bit_identical_images_and_targets(ray_cluster, storage_root, caplog):
    """Both image encodings store exactly the pixels the teacher saw, and the same targets; the
    fingerprint records the encoding and the precision, and an output refuses the other ones."""
    src = storage.join(storage_root, "images")
    put_files(src, good_images(3))
    caches = {}
    for enc in ("raw", "png"):
        out = storage.join(storage_root, f"cache-{enc}")
        run_job(f"source={src}", f"output={out}", f"image_encoding={enc}")
        caches[enc] = open_cache(out)
    raw, png = ({s["key"]: s for s in caches[e]} for e in ("raw", "png"))
    assert sorted(raw) == sorted(png) and len(raw) == 3
    for key in raw:
        assert raw[key]["image"].dtype == np.uint8 and np.array_equal(raw[key]["image"], png[key]["image"])
        assert np.array_equal(raw[key]["target"], png[key]["target"])
    fps = {e: c.fingerprint for e, c in caches.items()}
    assert (fps["raw"]["image_format"], fps["png"]["image_format"]) == ("raw", "png")
    assert fps["raw"]["compute_dtype"] == "float32"  # a CPU cluster: the reference precision
    members = {ext for name in caches["raw"].shards.column("shard").to_pylist()
               for ext in _member_exts(shard_url(caches["raw"].url, name))}
    assert "image.npy" in members and "png" not in members

    out = storage.join(storage_root, "cache-raw")
    for override, field in (("image_encoding=png", "image_format"), ("teacher.amp_dtype=bfloat16", "compute_dtype")):
        caplog.clear()
        with pytest.raises(SystemExit):
            run_job(f"source={src}", f"output={out}", override)
        assert "refusing to mix them" in caplog.text and field in caplog.text
    assert len(open_cache(out)) == 3  # nothing committed is lost


def _member_exts(tar_url: str) -> set[str]:
    with Storage().open(tar_url, "rb") as f, tarfile.open(fileobj=f) as tar:
        return {m.name.split(".", 1)[1] for m in tar if m.isfile()}


def test_a_compiled_teacher_writes_the_eager_teachers_targets(ray_cluster, tmp_path, monkeypatch):
    """teacher.compile=true, from a relative output in a fresh directory: the actors' compiled window
    forward stores the targets the eager teacher stores, and the fingerprint is the same cache's."""
    monkeypatch.chdir(tmp_path)
    put_files("images", good_images(2))
    run_job("source=images", "output=eager", "encoding=float32")
    run_job("source=images", "output=compiled", "encoding=float32", "teacher.compile=true", "teacher.window_batch=4")
    eager, compiled = open_cache("eager"), open_cache("compiled")
    assert eager.fingerprint["fingerprint"] == compiled.fingerprint["fingerprint"]  # compile does not change targets
    want = {s["key"]: s["target"] for s in eager}
    got = {s["key"]: s["target"] for s in compiled}
    assert sorted(got) == sorted(want) and len(got) == 2
    for key, target in got.items():
        assert np.linalg.norm(target - want[key]) / np.linalg.norm(want[key]) <= 1e-5
