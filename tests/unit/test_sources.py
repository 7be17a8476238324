"""Listing sources, stable keys, and decoding every kind of input users have."""
import numpy as np
import pytest

from pipeline import storage
from pipeline.cache.sources import list_source, make_key, source_kind
from pipeline.samples import builtin_uris, read_bytes
from pipeline.codecs import BadImage, decode_image
from pipeline.storage import Storage
from tests.images import bad_inputs, converted_images, good_images, png, scene


def test_keys_are_stable_unique_and_dot_free():
    a = make_key("s3://b/photos/sa_1.v2.jpg")
    assert a == make_key("s3://b/photos/sa_1.v2.jpg") and "." not in a and a.startswith("sa_1")
    assert make_key("s3://b/photos/sa_1.v2.jpg") != make_key("s3://b/other/sa_1.v2.jpg")
    assert "." not in make_key("/x/y/archive.tar#000/a.b.c.jpg")


def test_folder_listing_is_recursive_and_filters_extensions(tmp_path):
    files = good_images(3)
    for name, data in files.items():
        Storage().write_bytes(str(tmp_path / "a" / "b" / name), data)
    Storage().write_bytes(str(tmp_path / "a" / "README.txt"), b"not an image")
    items = list_source(str(tmp_path / "a"), Storage())
    assert [i.uri.rsplit("/", 1)[1] for i in items] == sorted(files)
    assert source_kind(str(tmp_path / "a"), Storage()) == "images"
    with pytest.raises(FileNotFoundError):
        list_source(str(tmp_path / "missing"), Storage())


def test_tar_listing_names_image_members(tmp_path):
    import webdataset as wds

    files = list(good_images(2).items())
    with open(tmp_path / "part-000.tar", "wb") as f, wds.TarWriter(f) as tw:
        for name, data in files:
            tw.write({"__key__": name.split(".")[0], "png": data, "json": b"{}"})
    items = list_source(str(tmp_path / "part-000.tar"), Storage())
    assert [i.member for i in items] == [name.split(".")[0] + ".png" for name, _ in files]
    assert all(i.uri == f"{tmp_path / 'part-000.tar'}#{i.member}" for i in items)


def test_builtin_samples_need_no_network():
    uris = builtin_uris()
    assert len(uris) >= 5
    for uri in uris:
        img = decode_image(read_bytes(uri, Storage()), max_pixels=10**8)
        assert img.dtype == np.uint8 and img.ndim == 3 and min(img.shape[:2]) >= 256
    assert np.array_equal(decode_image(read_bytes(uris[-1], Storage()), 10**8), decode_image(read_bytes(uris[-1], Storage()), 10**8))


@pytest.mark.parametrize("name", sorted(converted_images()))
def test_conversions_give_rgb_uint8(name):
    img = decode_image(converted_images()[name], max_pixels=10**8)
    assert img.dtype == np.uint8 and img.shape == (130, 170, 3)


def test_sixteen_bit_is_scaled_not_clipped():
    base = scene(40, 50, 1)
    gray = np.asarray(base.convert("L"))
    from PIL import Image

    img16 = Image.fromarray(gray.astype(np.uint16) * 257)
    assert img16.mode.startswith("I;16")
    out = decode_image(png(img16), max_pixels=10**8)
    assert np.array_equal(out[..., 0], gray)


@pytest.mark.parametrize("name", sorted(bad_inputs()))
def test_bad_inputs_raise_with_a_reason(name):
    data, reason = bad_inputs()[name]
    with pytest.raises(BadImage, match=reason):
        decode_image(data, max_pixels=2_000_000, min_side=16, max_aspect=8)


def test_exif_orientation_is_applied():
    from PIL import Image

    img = scene(60, 100, 2)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    import io

    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    assert decode_image(buf.getvalue(), max_pixels=10**8).shape == (100, 60, 3)


def test_alpha_is_composited_over_white():
    from PIL import Image

    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[:, :15] = [10, 20, 30, 255]  # opaque left half, fully transparent right half
    out = decode_image(png(Image.fromarray(rgba)), max_pixels=10**8)
    assert (out[:, :15] == [10, 20, 30]).all() and (out[:, 15:] == 255).all()


def test_folders_list_in_natural_order(tmp_path):
    """"The first N images" means sa_1, sa_2, ..., sa_10, not sa_1, sa_10, sa_100, sa_2."""
    for i in (10, 2, 1, 100, 9):
        Storage().write_bytes(str(tmp_path / f"sa_{i}.jpg"), png(scene(40, 40)))
    names = [it.uri.rsplit("/", 1)[1] for it in list_source(str(tmp_path), Storage())]
    assert names == ["sa_1.jpg", "sa_2.jpg", "sa_9.jpg", "sa_10.jpg", "sa_100.jpg"]


def test_a_tar_index_records_every_image_member_and_ranged_reads_return_their_bytes(tmp_path, monkeypatch):
    """Streaming a tar records each image member's offset and size; reading some members back by
    range returns exactly their bytes, in one request per run of nearby members of bounded span."""
    import io
    import tarfile

    from pipeline.cache import sources

    payloads = {f"sa_{i}.jpg": bytes([i]) * (500 + 700 * i) for i in range(6)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in payloads.items():
            for member, body in ((name, data), (name.replace(".jpg", ".json"), b"{}")):
                info = tarfile.TarInfo(member)
                info.size = len(body)
                tf.addfile(info, io.BytesIO(body))
    tar, out = str(tmp_path / "sa_000000.tar"), str(tmp_path / "cache")
    Storage().write_bytes(tar, buf.getvalue())
    seen: list = []
    streamed = {item.member: data for item, data in sources.iter_tar_images(tar, Storage(), {"sa_1.jpg"}, seen)}
    assert list(streamed) == ["sa_1.jpg"] and [m.name for m in seen] == list(payloads)  # the index has them all
    assert sources.read_tar_index(Storage(), out, tar) is None
    sources.write_tar_index(Storage(), out, tar, seen)
    index = sources.read_tar_index(Storage(), out, tar)
    assert index == seen

    ranges = []
    monkeypatch.setattr(Storage, "read_range", lambda self, url, a, b: ranges.append((a, b)) or
                        Storage.read_bytes(self, url)[a:b])
    wanted = [m for m in index if m.name in ("sa_1.jpg", "sa_2.jpg", "sa_5.jpg")]
    read = {item.member: data for item, data in sources.read_tar_members(tar, Storage(), wanted)}
    assert read == {n: payloads[n] for n in ("sa_1.jpg", "sa_2.jpg", "sa_5.jpg")}
    assert len(ranges) == 1  # all within READ_GAP of each other: one request
    monkeypatch.setattr(sources, "READ_GAP", 0)
    ranges.clear()
    assert [i.member for i, _ in sources.read_tar_members(tar, Storage(), wanted)] == ["sa_1.jpg", "sa_2.jpg", "sa_5.jpg"]
    assert len(ranges) == 3 and ranges[0] == (index[1].offset, index[1].offset + index[1].size)
    monkeypatch.setattr(sources, "READ_GAP", 1 << 20)
    monkeypatch.setattr(sources, "READ_SPAN", index[2].offset + index[2].size - index[1].offset)
    ranges.clear()  # a bounded span: sa_1 and sa_2 in one request, sa_5 (past the span) in another
    assert [i.member for i, _ in sources.read_tar_members(tar, Storage(), wanted)] == ["sa_1.jpg", "sa_2.jpg", "sa_5.jpg"]
    assert ranges == [(index[1].offset, index[2].offset + index[2].size), (index[5].offset, index[5].offset + index[5].size)]
    Storage().write_text(sources.tar_index_url(out, tar), "{not json")
    assert sources.read_tar_index(Storage(), out, tar) is None  # unreadable: the tar is streamed again


def test_limit_over_tars_reads_each_needed_tar_once_in_sequence_and_indexes_those_read_to_their_end(
        tmp_path, monkeypatch):
    """``limit=`` plans from one sequential read per tar it needs (never a seek per member) and
    opens no tar past them; tars read to their end get an index, so the next plan does not open them."""
    import io
    import tarfile

    from pipeline.cache import sources

    def tar_of(t: int) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for i in range(3):
                for member, body in ((f"sa_{3 * t + i}.jpg", bytes(4000)), (f"sa_{3 * t + i}.json", b"{}")):
                    info = tarfile.TarInfo(member)
                    info.size = len(body)
                    tf.addfile(info, io.BytesIO(body))
        return buf.getvalue()

    tars = [str(tmp_path / f"sa_{t:06d}.tar") for t in range(5)]
    for t, tar in enumerate(tars):
        Storage().write_bytes(tar, tar_of(t))
    out, opened = str(tmp_path / "cache"), []

    class Sequential(io.BufferedReader):
        def seek(self, *args):
            raise AssertionError("planning seeked in a tar")

    real_open = Storage.open
    monkeypatch.setattr(Storage, "open", lambda self, url, mode="rb", **kw: opened.append(url) or (
        Sequential(real_open(self, url, mode, **kw).detach()) if url.endswith(".tar") else real_open(self, url, mode, **kw)))
    first = sources.plan_tar_limit(tars, Storage(), 5, out)
    assert first == [(tars[0], ["sa_0.jpg", "sa_1.jpg", "sa_2.jpg"]), (tars[1], ["sa_3.jpg", "sa_4.jpg"])]
    assert sorted(u for u in opened if u.endswith(".tar")) == tars[:2]  # the rest are never opened
    assert [sources.read_tar_index(Storage(), out, t) is not None for t in tars] == [True, False, False, False, False]
    opened.clear()  # tar 0 from its index; then tars 1 and 2 at once (3 images a tar, 4 still needed)
    plan = sources.plan_tar_limit(tars, Storage(), 7, out)
    assert plan == [*first[:1], (tars[1], ["sa_3.jpg", "sa_4.jpg", "sa_5.jpg"]), (tars[2], ["sa_6.jpg"])]
    assert sorted(u for u in opened if u.endswith(".tar")) == tars[1:3]
    assert [sources.read_tar_index(Storage(), out, t) is not None for t in tars] == [True, True, True, False, False]
    opened.clear()
    assert sources.plan_tar_limit(tars, Storage(), 7, out) == plan
    assert not [u for u in opened if u.endswith(".tar")]  # indexed tars are not read again


def test_natural_bytes_sort_as_natural_keys_do():
    """The arrow sort of a listing orders names exactly as `natural_key` (so `limit=` picks the same images)."""
    import random

    from pipeline.cache.sources import natural_bytes, natural_key

    rng = random.Random(0)
    alphabet = ["0", "00", "1", "01", "9", "10", "123", "_", "-", ".", "/", "a", "b", "sa", "é", "٣", ""]
    names = {"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))) for _ in range(20000)}
    assert sorted(names, key=natural_bytes) == sorted(names, key=natural_key)


def test_a_folder_is_listed_as_names_below_it_in_natural_order_and_once(tmp_path, monkeypatch):
    from pipeline.cache.sources import list_images

    for name in ("b/sa_10.jpg", "b/sa_9.jpg", "a/x.png", "sa_2.jpg", "notes.txt"):
        Storage().write_bytes(str(tmp_path / "src" / name), b"x")
    monkeypatch.chdir(tmp_path)
    listed = list_images(str(tmp_path / "src"), Storage())
    assert listed.root == str(tmp_path / "src") + "/"
    assert listed.names.to_pylist() == ["a/x.png", "b/sa_9.jpg", "b/sa_10.jpg", "sa_2.jpg"]
    assert listed.head(2).uris() == [str(tmp_path / "src" / "a/x.png"), str(tmp_path / "src" / "b/sa_9.jpg")]
    Storage().write_text("list.txt", "src/sa_2.jpg\nsrc/a/x.png\n# a comment\nsrc/sa_2.jpg\n")
    assert list_images(str(tmp_path / "list.txt"), Storage()).uris() == [str(tmp_path / "src/a/x.png"),
                                                                        str(tmp_path / "src/sa_2.jpg")]
    single = list_images(str(tmp_path / "src" / "sa_2.jpg"), Storage())
    assert (single.root, single.names.to_pylist()) == ("", [str(tmp_path / "src" / "sa_2.jpg")])


def test_make_keys_fast_path_gives_the_keys_url_parsing_gives():
    """Keys are stable across versions: the unparsed fast path agrees with parsing every URI."""
    import hashlib
    import random
    import re
    import urllib.parse
    from pathlib import PurePosixPath

    from pipeline.cache import sources

    def parsed(uri: str) -> str:
        uri = storage.public_url(uri)
        stem = PurePosixPath(urllib.parse.urlparse(uri).path or uri).name.split(".")[0]
        stem = re.sub(r"[^A-Za-z0-9_-]+", "-", stem)[:48].strip("-") or "img"
        return f"{stem}_{hashlib.sha1(uri.encode()).hexdigest()[:12]}"

    rng = random.Random(0)
    parts = ["s3://", "S3://", "gs://", "https://", "/", "b", "bucket", "u:p@", "@", ".", "..", "a.jpg", "x y", "é",
             "?q=1", "#m", ";p", "%20", ":8080", "//", "sa_1.JPG", "-", "_", ","]
    uris = ["".join(rng.choice(parts) for _ in range(rng.randint(1, 8))) for _ in range(20_000)]
    uris += ["s3://bucket/sa1b/sa_1.jpg", "/data/sa1b/a b/sa_2.png", "gs://b/x/.", "/x/..", "s3://b/sa.tar#sa_3.jpg"]
    fast = sum(bool(sources._PLAIN_URI.fullmatch(u)) for u in uris)
    assert [sources.make_key(u) for u in uris] == [parsed(u) for u in uris] and fast > 200
