"""Names a cache gives (sample keys, shard names, tar member names) are refused where a reader meets
them unless they are in the grammar the cache job writes, so nothing a cache holds can name a path
outside its directory (the held-out samples' folder, an output)."""
import io
import os
import tarfile
import tempfile

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline import storage
from pipeline.cache import shards
from pipeline.cache.encode import encode_image, encode_members, quantize
from pipeline.cache.reader import (FORMAT, CacheError, UnsafeName, check_manifest, check_member, check_names,
                                   is_safe_name, iter_raw_shard, open_cache)
from pipeline.cache.sources import make_key
from pipeline.storage import Storage
from pipeline.train.validation import HeldOut, inside

UNSAFE = ["", ".", "..", "../escaped/pwn", "/etc/passwd", "a/b", "a\\b", "C:\\x", ".hidden", "a.b", "a b", "a\x00b",
          "a\nb", "a,b", "k\u00e9y", "x" * 129]


def test_every_key_the_cache_job_writes_is_a_safe_name():
    uris = ["s3://b/sa1b/sa_000001.jpg", "/data/../weird name.v2.png", "https://h/x.jpg?X-Amz-Signature=1",
            "builtin://synthetic/0", "s3://b/t.tar#dir/../a.jpg", "/d/\u00fcn\u00efcode.jpg", "/d/.hidden.jpg",
            "/d/" + "long" * 40 + ".jpg", "s3://b/.."]
    for uri in uris:
        for view in (0, 1, 12):  # as `pipeline.cache.job.work_items` names a view
            assert is_safe_name(f"{make_key(uri)}_v{view}"), uri


@pytest.mark.parametrize("name", UNSAFE)
def test_an_unsafe_name_is_refused_naming_it_and_the_cache(name):
    assert not is_safe_name(name)
    names = pa.chunked_array([["a_v0", "b_v1"], ["c_v0", name, "d_v0"]])  # anywhere in any chunk
    with pytest.raises(UnsafeName) as refused:
        check_names(names, "sample key", "s3://bucket/cache")
    assert repr(name) in str(refused.value) and "s3://bucket/cache" in str(refused.value)
    assert isinstance(refused.value, ValueError) and isinstance(refused.value, CacheError)  # jobs exit 2 on it


def test_safe_names_pass_and_a_missing_one_is_refused():
    check_names(pa.array([], pa.string()), "sample key", "c")
    check_names(pa.chunked_array([["a_v0", "Z-9_x", "x" * 128]]), "sample key", "c")
    with pytest.raises(UnsafeName, match="None"):
        check_names(pa.array(["a_v0", None]), "sample key", "c")


@pytest.mark.parametrize("member", ["k_v0.json", "k_v0.target.npy", "k_v0.image.npy", "sa-1_0123456789ab_v3.png",
                                    "k_v0.target_scale.npy"])
def test_member_names_the_cache_job_writes_pass(member):
    check_member(member, "c/shards/s.tar")


@pytest.mark.parametrize("member", ["../escaped/pwn.json", "k_v0/../../pwn.json", "/abs/k_v0.json", "k_v0..json",
                                    "k_v0.json.", "k_v0.a/b", "k_v0", ".json", "k_v0.\u00e9", "k\\..\\x.json"])
def test_member_names_outside_the_grammar_are_refused_naming_them(member):
    with pytest.raises(UnsafeName, match="c/shards/s.tar") as refused:
        check_member(member, "c/shards/s.tar")
    assert repr(member) in str(refused.value)


def _sample(key: str, seed: int) -> tuple[dict, dict]:
    """(tar members, manifest row) of one tiny sample under `key`."""
    target = {k: v.numpy() for k, v in quantize(torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(seed)),
                                                "float16").items()}
    image = np.random.default_rng(seed).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    members = encode_members(key, encode_image(image, "raw"), "image.npy", target,
                             {"image_size": [32, 48], "grid": [2, 3]})
    row = {"key": key, "source": "x", "view": 0, "height": 32, "width": 48, "grid_h": 2, "grid_w": 3,
           "target_bytes": len(members["target.npy"]), "image_checksum": "", "target_checksum": "", "windows": 1}
    return members, row


def _cache(root, keys: list[str]) -> str:
    out = str(root / "cache")
    shards.write_json(Storage(), storage.join(out, "teacher.json"), {"format": FORMAT})
    shards.create_tables(Storage(), out)
    samples = [_sample(k, i) for i, k in enumerate(keys)]
    shards.commit_shard(Storage(), out, [m for m, _ in samples], [r for _, r in samples], run="t")
    return out


def test_a_manifest_that_names_a_path_outside_is_refused_on_open(tmp_path):
    out = _cache(tmp_path, ["a_v0", "../escaped/pwn"])
    with pytest.raises(UnsafeName, match=r"sample key '\.\./escaped/pwn'") as refused:
        open_cache(out)
    assert storage.resolve(out) in str(refused.value)
    assert not any(p.name == "escaped" for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("field,value,named", [("shard", "../../elsewhere", "shard name '../../elsewhere'"),
                                               ("tar", "shards/../../x.tar", "shard path's name '../../x'"),
                                               ("tar", "/etc/x.tar", "shard path '/etc/x.tar'")])
def test_a_manifest_row_whose_shard_is_not_below_shards_is_refused(tmp_path, field, value, named):
    """Readers open ``shards/<shard>.tar`` (and hash the row's tar): both must stay in the cache."""
    out = _cache(tmp_path, ["a_v0"])
    row = dict(open_cache(out).manifest.to_pylist()[0], key="b_v0", **{field: value})
    shards._append(Storage(), out, shards.MANIFEST, pa.Table.from_pylist([row], schema=shards.SAMPLE_SCHEMA))
    with pytest.raises(UnsafeName) as refused:
        open_cache(out)
    assert named in str(refused.value)


def test_an_empty_manifest_passes_and_a_row_without_a_tar_path_is_refused():
    """No rows: nothing to refuse (the job then says the cache holds no samples). A null tar path is
    not below shards/ either."""
    empty = pa.Table.from_pylist([], schema=shards.SAMPLE_SCHEMA)
    check_manifest("u", empty)
    row = {"key": "a_v0", "shard": "s", "tar": None}
    with pytest.raises(UnsafeName, match="shard path None"):
        check_manifest("u", pa.Table.from_pylist([row], schema=shards.SAMPLE_SCHEMA))


def test_a_tar_member_that_names_a_path_outside_is_refused_before_a_held_out_copy(tmp_path, monkeypatch):
    """Every regular member's name is checked, whichever samples the reader keeps: validation caches
    the held-out members under a temporary folder, and nothing lands outside it."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    out = _cache(tmp_path, ["a_v0", "b_v0"])
    cache = open_cache(out)
    intact = HeldOut(out, Storage(), cache.manifest, rank=0, world=1)
    assert [s["key"] for s in intact.samples()] == ["a_v0", "b_v0"]  # a clean cache reads as before
    intact.close()
    tar = cache.shard_urls()[0]
    with tarfile.open(tar, "a") as tf:  # a member appended to a committed tar; its manifest is intact
        info = tarfile.TarInfo("../escaped/pwn.json")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"{}"))
    assert len(open_cache(out)) == 2
    for keep in (None, {"a_v0"}.__contains__):
        with pytest.raises(UnsafeName, match=r"tar member '\.\./escaped/pwn\.json'"):
            list(iter_raw_shard(tar, Storage(), keep=keep))
    held = HeldOut(out, Storage(), cache.manifest, rank=0, world=1)
    with pytest.raises(UnsafeName, match="pwn"):
        next(held.samples())
    held.close()
    assert not any(p.name == "escaped" for p in tmp_path.rglob("*"))


def test_a_local_path_made_of_cache_names_stays_inside_its_folder(tmp_path):
    root = os.path.realpath(tmp_path / "held")
    os.makedirs(root)
    assert inside(root, "k_v0", "json") == os.path.join(root, "k_v0", "json")
    os.symlink(tmp_path, os.path.join(root, "link"))  # a name that resolves elsewhere
    for parts in (("..", "escaped"), ("k_v0", "..", "..", "x"), ("/etc", "passwd"), ("link", "x"), ("k", "..")):
        with pytest.raises(UnsafeName, match="outside"):
            inside(root, *parts)
