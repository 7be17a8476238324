"""The cache job end to end on a real local Ray cluster, on local disk and on a loopback S3 server."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import spar
from jobs import cache_teacher
from pipeline import open_cache, storage
from pipeline.bench.s3proxy import FaultyProxy
from pipeline.cache.augment import AugmentConfig, augment
from pipeline.cache.reader import CacheError, shard_url
from pipeline.cache.sources import make_key
from pipeline.codecs import decode_image
from pipeline.storage import Storage
from tests.images import bad_inputs, converted_images, good_images
from tests.integration.conftest import TINY, SharedCache, make_bucket, put_files, snapshot

TOLERANCE = {"float32": 1e-6, "float16": 2e-3, "int8": 2e-2}  # relative L2 error of the stored target


def run_job(*args: str) -> dict:
    return cache_teacher.main([*TINY, *args])


def recompute(bb, sample, stride=24):
    x = bb.normalize(torch.from_numpy(sample["image"].copy()))
    with torch.no_grad():
        return spar.sliding_window_features(bb, x, stride=stride)[0].numpy()


def check_round_trip(cache_url: str, files: dict[str, bytes], encoding: str, views: int) -> None:
    """Every sample of the cache: its target within the encoding's bound of the teacher recomputed
    here, its manifest row and metadata in agreement, its pixels exactly the augmented view of the
    source file, and its key the source's key and view."""
    cache = open_cache(cache_url)
    assert len(cache) == len(files) * views and cache.verify() == []
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
        assert sample["image"].dtype == np.uint8 and plan == meta["augment"] and np.array_equal(view, sample["image"])
        assert meta["source_key"] == make_key(meta["source"]) and key == f"{meta['source_key']}_v{meta['view']}"
    assert seen == set(manifest) and len(seen) == len(files) * views
    assert sum(cache.shards.column("samples").to_pylist()) == len(seen)


def _last_summary(out: str) -> dict:
    """The summary.json of the latest job into `out` (run ids start with their start time)."""
    runs = sorted(u for u in Storage().list_files(storage.join(out, "runs")) if u.endswith("/summary.json"))
    return json.loads(Storage().read_text(runs[-1]))


@pytest.mark.slow
@pytest.mark.parametrize("encoding,where", [("int8", "local"), ("float32", "s3")])
def test_every_encoding_round_trips_and_bad_inputs_are_recorded_or_converted_keeping_the_good(
        ray_cluster, s3_endpoint, tmp_path, encoding, where):
    """Each target encoding (float16: the shared caches) on each storage, among every kind of input:
    every bad input is recorded with its reason, every unusual but valid one converted; with more
    failures than max_failed_fraction (default 5%) the job exits non-zero, after committing everything
    that succeeded, and what it committed round-trips (`check_round_trip`)."""
    root = str(tmp_path / "store") if where == "local" else f"s3://{make_bucket(s3_endpoint)}/root"
    src, out = storage.join(root, "images"), storage.join(root, "cache")
    good, converted, bad = good_images(5), converted_images(), bad_inputs()
    put_files(src, {**good, **converted, **{k: v for k, (v, _) in bad.items()}})
    with pytest.raises(SystemExit) as exit_info:
        run_job(f"source={src}", f"output={out}", "views=2", f"encoding={encoding}", "max_pixels=2000000",
                "min_source_side=16", "max_aspect=8")
    assert exit_info.value.code not in (0, None)
    summary, cache = _last_summary(out), open_cache(out)
    assert summary["computed"] == len(cache) == (len(good) + len(converted)) * 2
    assert summary["failed"] == len(cache.errors) == len(bad) * 2  # an input is recorded per view asked of it
    errors = {r["source"].rsplit("/", 1)[1]: r["reason"] for r in cache.errors.to_pylist()}
    assert set(errors) == set(bad)
    for name, (_, reason) in bad.items():
        assert reason in errors[name], (name, errors[name])
    check_round_trip(out, {**good, **converted}, encoding, views=2)  # RGB uint8 pixels: the converted view's


def test_round_trip_on_local_disk_and_s3(shared_cache: SharedCache, caplog):
    """The default encoding (float16) on both storages: the session's shared caches. On either, a rerun
    that would change the teacher's settings is refused, naming the field, and changes nothing."""
    check_round_trip(shared_cache.url, shared_cache.files, "float16", views=2 if "views=2" in shared_cache.args else 1)
    before = snapshot(shared_cache.url)
    with pytest.raises(SystemExit):
        cache_teacher.main(shared_cache.argv("stride=32"))
    assert "refusing to mix them" in caplog.text and "stride" in caplog.text
    assert snapshot(shared_cache.url) == before


@pytest.mark.slow
def test_resume_and_extend_compute_only_new_samples_however_the_sources_are_listed(ray_cluster, storage_root):
    """A folder with limit=4; the same four again through a .txt list of relative paths (with a
    comment); all six through a .parquet list of absolute URIs; then two views. A URI is the same key
    however it is listed, so each run computes exactly what is not committed yet, and committed
    shards are never rewritten."""
    import pyarrow as pa

    src, out = storage.join(storage_root, "images"), storage.join(storage_root, "cache")
    files = good_images(6)
    put_files(src, files)
    names = sorted(files)
    first = run_job(f"source={src}", f"output={out}", "limit=4")
    shards_before = snapshot(storage.join(out, "shards"))
    listed = storage.join(storage_root, "list.txt")
    Storage().write_text(listed, "# the first four\n" + "\n".join(f"images/{n}" for n in names[:4]))
    again = run_job(f"source={listed}", f"output={out}")
    with Storage().open(storage.join(storage_root, "list.parquet"), "wb") as f:
        pq.write_table(pa.table({"uri": [storage.join(src, n) for n in names]}), f)
    extended = run_job(f"source={storage.join(storage_root, 'list.parquet')}", f"output={out}")
    assert (first["computed"], again["computed"], extended["computed"]) == (4, 0, 2)
    assert (again["already_committed"], extended["already_committed"]) == (4, 4) and len(open_cache(out)) == 6
    assert snapshot(storage.join(out, "shards")).items() >= shards_before.items()  # committed shards untouched
    more_views = run_job(f"source={src}", f"output={out}", "views=2")
    assert more_views["computed"] == 6 and len(open_cache(out)) == 12


@pytest.mark.slow
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


@pytest.mark.slow
def test_sa1b_tars_with_limit_take_the_first_images_in_tar_order(ray_cluster, storage_root):
    """SA-1B as it ships: ``limit=N`` caches the first N images, tars in natural order and members in
    tar order (not sorted), and a larger limit later adds exactly the next ones (so a rerun takes the
    same N). On S3 both runs go through a proxy that fails 10% of the requests (every fault kind,
    credentials in ``storage_options``): the same N, every key once, every shard whole."""
    src, out = storage.join(storage_root, "sa1b"), storage.join(storage_root, "cache")
    images = list(good_images(9).values())
    layout = {"sa_000000.tar": ["sa_1", "sa_2", "sa_3"], "sa_000001.tar": ["sa_10", "sa_4", "sa_5"],
              "sa_000002.tar": ["sa_6", "sa_7", "sa_8"]}
    for t, (tar, names) in enumerate(layout.items()):
        put_files(src, {tar: _sa1b_tar(names, images[3 * t:3 * t + 3])})
    order = [make_key(f"{storage.join(src, tar)}#{n}.jpg") for tar, names in layout.items() for n in names]
    remote = src.startswith("s3://")
    with FaultyProxy(os.environ["AWS_ENDPOINT_URL"], faults=0.1 if remote else 0.0, seed=3) as proxy:
        via = [f"storage_options.endpoint_url={proxy.endpoint}", "storage_options.key=testing",
               "storage_options.secret=testing", "storage_options.retry.max_backoff_s=1"] if remote else []
        first = run_job(f"source={src}/", f"output={out}", "limit=5", *via)
        assert (first["source_images"], first["computed"], first["failed"]) == (5, 5, 0)
        assert sorted(k.rsplit("_v", 1)[0] for k in open_cache(out).keys()) == sorted(order[:5])
        more = run_job(f"source={src}/", f"output={out}", "limit=8", *via)  # the same first five, and the next three
        assert (more["already_committed"], more["computed"], more["committed_total"]) == (5, 3, 8)
        assert sorted(k.rsplit("_v", 1)[0] for k in open_cache(out).keys()) == sorted(order[:8])
        proxy.set_faults(0.0)
        if not remote:
            return
        faults = proxy.faults()
        assert sum(faults.values()) >= 5, faults  # the storm happened
        assert first["storage_retries"] + more["storage_retries"] > 0  # and the summaries show it
        assert more["keys_committed_twice"] == 0 and open_cache(out).verify() == []
        # Every tar was read to its end once, so the cache indexes their members: extending it plans
        # limit= from the indexes, reads no byte of the two tars whose images are all committed nor of the
        # committed images of the third, and reads the one image it needs by one ranged read, not its tar.
        tar_bytes = sum(Storage().size(storage.join(src, tar)) for tar in layout)  # for the messages
        prefix = "/" + src.split("://", 1)[1] + "/"
        proxy.reset()
        last = run_job(f"source={src}/", f"output={out}", "limit=9", *via)
        assert (last["already_committed"], last["computed"], last["committed_total"]) == (8, 1, 9)
        requests, read = proxy.traffic(prefix)
        assert (requests, read) == (1, len(images[8])), (requests, read, tar_bytes)


def test_an_image_prefix_is_listed_a_page_at_a_time_in_natural_order(storage_root):
    """Listing a source folder never holds the storage's detail of every object (nor lets s3fs
    cache it): pages of names, reduced to one arrow array below the folder."""
    from pipeline.cache.sources import list_images, source_kind

    src = storage.join(storage_root, "images")
    put_files(src, {f"sa_{i}.jpg": b"x" for i in range(25)} | {"sub/sa_1.png": b"x", "readme.md": b"x"})
    store = Storage()
    pages = list(store.iter_files(src, suffixes=(".jpg", ".png"), page=10))
    assert [len(p) for p in pages] == [10, 10, 6]
    assert sorted(u for p in pages for u in p) == store.list_files(src, suffixes=(".jpg", ".png"))
    if src.startswith("s3://"):
        assert not store.filesystem(src)[0].dircache  # nothing of the listing kept by s3fs
    assert source_kind(src, store) == "images"
    listed = list_images(src, store)
    assert listed.names.to_pylist() == [f"sa_{i}.jpg" for i in range(25)] + ["sub/sa_1.png"]
    assert listed.uris(0, 1) == [storage.join(src, "sa_0.jpg")]


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


@pytest.mark.slow
def test_raw_and_png_caches_hold_bit_identical_images_and_targets(local_cache: SharedCache, caplog):
    """Both image encodings store exactly the pixels the teacher saw, and the same targets. The
    fingerprint records the encoding and the precision, and a cache refuses a job that would change
    any of them (or the stride, or the target encoding), naming the field, with nothing written."""
    raw_url = local_cache.url
    png_url = f"{raw_url}-png"
    cache_teacher.main(local_cache.argv("image_encoding=png", output=png_url))
    caches = {"raw": open_cache(raw_url), "png": open_cache(png_url)}
    raw, png = ({s["key"]: s for s in caches[e]} for e in ("raw", "png"))
    assert sorted(raw) == sorted(png) and len(raw) == len(caches["raw"])
    for key in raw:
        assert raw[key]["image"].dtype == np.uint8 and np.array_equal(raw[key]["image"], png[key]["image"])
        assert np.array_equal(raw[key]["target"], png[key]["target"])
    fps = {e: c.fingerprint for e, c in caches.items()}
    assert (fps["raw"]["image_format"], fps["png"]["image_format"]) == ("raw", "png")
    assert fps["raw"]["compute_dtype"] == "float32"  # a CPU cluster: the reference precision
    members = {ext for name in caches["raw"].shards.column("shard").to_pylist()
               for ext in _member_exts(shard_url(raw_url, name))}
    assert "image.npy" in members and "png" not in members

    before = snapshot(raw_url)
    for override, field in (("image_encoding=png", "image_format"), ("teacher.amp_dtype=bfloat16", "compute_dtype"),
                            ("stride=32", "stride"), ("encoding=int8", "encoding")):
        caplog.clear()
        with pytest.raises(SystemExit):
            cache_teacher.main(local_cache.argv(override))
        assert "refusing to mix them" in caplog.text and field in caplog.text, override
    assert snapshot(raw_url) == before  # the refused jobs wrote nothing, lost nothing


def _member_exts(tar_url: str) -> set[str]:
    with Storage().open(tar_url, "rb") as f, tarfile.open(fileobj=f) as tar:
        return {m.name.split(".", 1)[1] for m in tar if m.isfile()}


@pytest.mark.slow
def test_a_compiled_teacher_writes_the_eager_teachers_targets(ray_cluster, tmp_path, monkeypatch):
    """teacher.compile=true, from a relative output in a fresh directory: the actors' compiled window
    forward stores the eager teacher's targets, under the eager cache's fingerprint."""
    from pipeline.cache.job import CacheConfig, build_fingerprint
    from pipeline.config import parse_config

    monkeypatch.chdir(tmp_path)
    put_files("images", good_images(2))
    eager_args = [*TINY, "source=images", "output=compiled", "encoding=float32"]
    cache_teacher.main([*eager_args, "teacher.compile=true", "teacher.window_batch=4"])
    compiled = open_cache("compiled")
    eager = build_fingerprint(parse_config(CacheConfig, eager_args), Storage())
    assert compiled.fingerprint["fingerprint"] == eager["fingerprint"]  # compile does not change targets
    bb = spar.load_backbone("maskclip-test", pretrained=None)
    samples = list(compiled)
    assert len(samples) == 2
    for sample in samples:
        want = recompute(bb, sample)  # the eager teacher, here
        assert np.linalg.norm(sample["target"] - want) / np.linalg.norm(want) <= 1e-5
