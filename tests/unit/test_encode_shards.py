"""Target encodings, sample members, and the shard commit protocol on local disk."""
import numpy as np
import pytest
import torch

from pipeline import storage
from pipeline.cache import shards
from pipeline.cache.reader import iter_shard, open_cache
from pipeline.cache.encode import CorruptSample, decode_members, encode_members, quantize
from pipeline.codecs import png_bytes
from pipeline.storage import Storage


def _sample(key, h=4, w=6, d=32, encoding="float16", seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(h, w, d, generator=g)
    image = np.random.default_rng(seed).integers(0, 256, (h * 16, w * 16, 3), dtype=np.uint8)
    enc = {k: v.numpy() for k, v in quantize(target, encoding).items()}
    meta = {"image_size": [h * 16, w * 16], "grid": [h, w]}
    return encode_members(key, png_bytes(image), enc, meta), image, target.numpy()


@pytest.mark.parametrize("encoding,tol", [("float32", 0), ("float16", 1e-3), ("int8", 1e-2)])
def test_members_round_trip(encoding, tol):
    members, image, target = _sample("k", encoding=encoding)
    out = decode_members(members)
    assert np.array_equal(out["image"], image)
    assert np.linalg.norm(out["target"] - target) / np.linalg.norm(target) <= tol
    assert out["target"].dtype == np.float32


def test_int8_bytes_and_cosine_for_d512():
    target = torch.randn(64, 128, 512)
    q = quantize(target, "int8")
    per_token = (q["target"].numel() + q["target_scale"].numel() * 4) / (64 * 128)
    deq = q["target"].float() * q["target_scale"]
    cos = torch.nn.functional.cosine_similarity(deq, target, dim=-1)
    assert per_token <= 600 and cos.min() >= 0.999


def test_corruption_is_detected():
    members, _, _ = _sample("k")
    bad = dict(members)
    t = bytearray(bad["target.npy"])
    t[-1] ^= 0xFF
    bad["target.npy"] = bytes(t)
    with pytest.raises(CorruptSample, match="checksum"):
        decode_members(bad)
    with pytest.raises(CorruptSample, match="missing"):
        decode_members({k: v for k, v in members.items() if k != "png"})


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
             "target_bytes": len(s["target.npy"]), "target_checksum": "c", "windows": 1} for s in samples]


def test_commit_protocol_and_cleanup(tmp_path):
    out = str(tmp_path / "cache")
    shards.write_json(Storage(), storage.join(out, "teacher.json"), {"format": "spar-teacher-cache/1"})
    batch = [_sample(f"k{i}", seed=i)[0] for i in range(3)]
    row = shards.commit_shard(Storage(), out, batch, _rows(batch))
    assert row["samples"] == 3 and not row["skipped"]
    assert shards.commit_shard(Storage(), out, batch, _rows(batch))["skipped"]  # a retried writer rewrites nothing
    # a crashed writer: tar and sample rows without a commit
    orphan = [_sample("z", seed=9)[0]]
    name = shards.shard_name(["z"])
    shards._write_tar(Storage(), shards.shard_url(out, name), orphan, mtime=0.0)
    cache = open_cache(out)
    assert sorted(cache.keys()) == ["k0", "k1", "k2"] and cache.verify() == []
    assert [s["key"] for s in iter_shard(cache.shard_urls()[0], Storage())] == ["k0", "k1", "k2"]
    assert shards.clean_uncommitted(Storage(), out) == 1
    assert not Storage().exists(shards.shard_url(out, name))


def test_a_commit_racing_a_cleanup_still_has_its_tar_and_rows(tmp_path, monkeypatch):
    """A straggling writer of a killed run commits just after the next run's clean-up removed its
    tar and rows: the writer puts them back, byte for byte."""
    out = str(tmp_path / "cache")
    shards.write_json(Storage(), storage.join(out, "teacher.json"), {"format": "spar-teacher-cache/1"})
    write_table = shards._write_table

    def cleanup_then_write(store, url, table):
        if "/manifest/shards/" in url:  # the commit: a concurrent clean-up runs right before it lands
            assert shards.clean_uncommitted(store, out) == 2
        write_table(store, url, table)

    monkeypatch.setattr(shards, "_write_table", cleanup_then_write)
    batch = [_sample(f"k{i}", seed=i)[0] for i in range(2)]
    shards.commit_shard(Storage(), out, batch, _rows(batch))
    cache = open_cache(out)
    assert sorted(cache.keys()) == ["k0", "k1"] and cache.verify() == []


def test_duplicate_keys_across_shards_are_read_once(tmp_path):
    out = str(tmp_path / "cache")
    shards.write_json(Storage(), storage.join(out, "teacher.json"), {"format": "spar-teacher-cache/1"})
    a = [_sample(f"k{i}", seed=i)[0] for i in range(2)]
    b = [_sample(f"k{i}", seed=i)[0] for i in range(1, 3)]
    shards.commit_shard(Storage(), out, a, _rows(a))
    shards.commit_shard(Storage(), out, b, _rows(b))
    cache = open_cache(out)
    assert sorted(cache.keys()) == ["k0", "k1", "k2"]
    assert sorted(s["key"] for s in cache) == ["k0", "k1", "k2"]
