"""A copy of a real cache with names planted in it that climb out of their directories: a sample
whose key is ``../escaped/pwn`` (in the manifest and its tar), and a tar member of that name beside
an intact manifest. Training, its validation, its loader and the inspector refuse them, naming
them, and nothing is written outside the run's folders.

Evaluation reads datasets, not caches, and names its outputs from its config: no cache name reaches it."""
from __future__ import annotations

import io
import shutil
import tarfile
import tempfile

import pyarrow.compute as pc
import pytest

from jobs import inspect_cache, train_student
from pipeline import open_cache
from pipeline.cache import shards
from pipeline.cache.reader import UnsafeName, iter_raw_shard
from pipeline.storage import Storage
from pipeline.train.epochs import SampleTable, plan_epoch
from pipeline.train.loader import PlannedBatches
from pipeline.train.validation import HeldOut
from tests.integration.conftest import SharedCache

PLANTED = "../escaped/pwn"
ROW = ("source", "view", "height", "width", "grid_h", "grid_w", "target_bytes", "image_checksum", "target_checksum",
       "windows")


def _escaped(root) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name == "escaped"]


def test_planted_names_are_refused_by_every_reader_and_nothing_escapes(local_cache: SharedCache, tmp_path, caplog,
                                                                      monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # validation's folder, where we can look
    (tmp_path / "tmp").mkdir()

    # 1. A sample under a climbing key, committed to a copy the way the cache job commits a shard.
    keyed = tmp_path / "keyed"
    shutil.copytree(local_cache.url, keyed)
    real = open_cache(str(keyed))
    raw = next(iter_raw_shard(real.shard_urls()[0], Storage()))
    row = real.manifest.filter(pc.equal(real.manifest.column("key"), raw["__key__"])).to_pylist()[0]
    members = {k: bytes(v) for k, v in raw.items() if not k.startswith("__")}
    shards.commit_shard(Storage(), str(keyed), [dict(members, __key__=PLANTED)],
                        [{k: row[k] for k in ROW} | {"key": PLANTED}], run="planted")
    with pytest.raises(UnsafeName, match="sample key '../escaped/pwn'"):
        open_cache(str(keyed))
    for job, args in ((train_student, [f"output={tmp_path / 'runs'}", "val_fraction=0.5"]),
                      (inspect_cache, [f"output={tmp_path / 'inspect'}"])):
        caplog.clear()
        with pytest.raises(SystemExit) as refused:  # on the driver: no worker starts, nothing is written
            job.main([f"cache={keyed}", *args])
        assert refused.value.code == 2 and PLANTED in caplog.text and str(keyed) in caplog.text

    # 2. A member of that name appended to a committed tar: the manifest is intact, the tar is not.
    membered = tmp_path / "membered"
    shutil.copytree(local_cache.url, membered)
    cache = open_cache(str(membered))
    with tarfile.open(cache.shard_urls()[0], "a") as tf:
        info = tarfile.TarInfo(f"{PLANTED}.json")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"{}"))
    plan = plan_epoch(SampleTable.from_table(cache.samples), seed=0, epoch=0, rank=0, world_size=1, workers=1,
                      batch_size=1, shuffle_buffer=1)
    with pytest.raises(UnsafeName, match="tar member '../escaped/pwn.json'"):
        list(PlannedBatches(str(membered), Storage(), plan))  # what each loader process of a rank runs
    held = HeldOut(str(membered), Storage(), cache.manifest, rank=0, world=1)
    with pytest.raises(UnsafeName, match="tar member '../escaped/pwn.json'"):
        next(held.samples())  # what each rank's validation runs first
    held.close()
    caplog.clear()
    with pytest.raises(SystemExit):
        inspect_cache.main([f"cache={membered}", f"output={tmp_path / 'inspect'}"])
    assert f"{PLANTED}.json" in caplog.text

    assert _escaped(tmp_path) == [] and not (tmp_path / "runs").exists() and not (tmp_path / "inspect").exists()
