"""Safe training runs on a real local Ray cluster with DeepSpeed: a ZeRO-3 run resumed on fewer ranks
reads its pinned cache versions while the caches grow (every sample of the epoch once), and DeepSpeed
JSON files that contradict the job are refused. (Exact and elastic resume, padding steps, and
refused checkpoints are tested on a mixture of caches: test_mixture.py.)"""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from jobs import cache_teacher, train_student
from pipeline import open_cache, storage
from pipeline.cache import shards
from pipeline.cache.reader import iter_raw_shard
from pipeline.storage import Storage
from pipeline.train.epochs import SampleTable, plan_epoch
from tests.images import good_images
from tests.integration.conftest import TINY, SharedCache, put_files

pytestmark = pytest.mark.slow  # end to end: left out of the quick loop, `pytest -m "not slow"`

BASE = ["batch_size=1", "lr=1e-3", "log_every=1", "record_keys=true", "scaling.cpus_per_worker=0.5",
        "val_fraction=0"]  # every sample trains: the tests count them (checkpoints: at max_steps and each epoch's end)


@pytest.fixture(scope="module")
def five(local_cache: SharedCache) -> str:
    """The session's local cache: 5 samples, so on 2 ranks rank 0 trains 3 per epoch and rank 1 trains
    2, then pads."""
    return local_cache.url


def _keys(run_dir: str) -> list[dict]:
    """Every row of the run's key log (epoch, step, rank, key, loss; one cache: its index is 0)."""
    rows = []
    for url in Storage().list_files(storage.join(run_dir, "keys")):
        rows += list(csv.DictReader(io.StringIO(Storage().read_text(url))))
    return [{"epoch": int(r["epoch"]), "step": int(r["step"]), "rank": int(r["rank"]), "key": r["key"],
             "loss": float(r["loss"])} for r in rows]


def _metrics(run_dir: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(Storage().read_text(storage.join(run_dir, "metrics.csv")))))


def _student(run_dir: str) -> dict:
    return json.loads(Storage().read_text(storage.join(run_dir, "student.json")))


def _check_every_sample_once(train_rows, run: Path, last: tuple[int, int], validates: bool = False) -> None:
    """Each epoch trained every one of `train_rows` (the manifest rows the run trains on): epoch 0 each
    once (none of its tail skipped, none repeated), and its row reports the loss of all of them; epoch 1
    followed the plan of an uninterrupted run on the `last` layout (ranks, loader processes). A run that
    `validates` scored its baseline once, whatever the resumes."""
    rows = _keys(str(run))
    keys = train_rows.column("key").to_pylist()
    epoch0 = [r for r in rows if r["epoch"] == 0]
    assert sorted(r["key"] for r in epoch0) == sorted(keys)  # each once: none skipped, none repeated
    epochs = [r for r in _metrics(str(run)) if r["kind"] == "epoch"]
    assert [int(r["epoch"]) for r in epochs] == [0, 1]
    vals = [int(r["step"]) for r in _metrics(str(run)) if r["kind"] == "val"]
    if validates:
        assert vals[0] == 0 and vals.count(0) == 1
    assert [int(r["samples"]) for r in epochs] == [len(keys)] * 2
    true_loss = sum(r["loss"] for r in epoch0) / len(epoch0)  # batch_size=1: one row per batch
    assert float(epochs[0]["loss"]) == pytest.approx(true_loss, rel=1e-5)

    table = SampleTable.from_table(train_rows)
    ranks, loaders = last
    for rank in range(ranks):
        plan = plan_epoch(table, seed=0, epoch=1, rank=rank, world_size=ranks, workers=loaders, batch_size=1,
                                 shuffle_buffer=8)
        planned = [key for batch in plan.ordered_batches() for key in batch]
        trained = [r["key"] for r in sorted(rows, key=lambda r: r["step"]) if r["epoch"] == 1 and r["rank"] == rank]
        assert trained == planned, rank


def _grow(cache_url: str, samples_from: str, n: int) -> None:
    """Commit the first `n` samples of the cache `samples_from` (keys new to `cache_url`, the same teacher)
    to `cache_url`, a shard each, as the cache job commits them: another writer growing the cache."""
    source = open_cache(samples_from)
    rows = {r["key"]: r for r in source.manifest.to_pylist()}
    for url in source.shard_urls():
        for raw in iter_raw_shard(url, Storage()):
            if n == 0:
                return
            key = raw["__key__"]
            members = {k: bytes(v) for k, v in raw.items() if not k.startswith("__")}
            # its manifest row as it was; write_shard sets the new shard's fields
            shards.commit_shard(Storage(), cache_url, [dict(members, __key__=key)], [rows[key]], run="grow")
            n -= 1


def test_a_zero3_resume_on_fewer_ranks_reads_its_pinned_versions_while_the_caches_grow(local_cache, tmp_path,
                                                                                       monkeypatch):
    """ZeRO-3 (parameters sharded too), checkpointed after one step on 2 ranks x 1 loader process and
    resumed on a single rank x 2: epoch 0 trains each sample once, epoch 1 follows the new layout's plan.
    Meanwhile the caches grow: a second cache job extends the training cache after the driver pinned
    its version and before the workers read it, and another writer commits to it before the resume;
    the run reads exactly its pinned samples, from start to resume. With ``val_cache=`` (another cache
    by the same teacher; 5 samples: uneven rank shares) nothing of the training cache is held out, and
    the student is scored on every sample of the other cache, at the version pinned at the start, even
    once that cache has grown."""
    import pipeline.train.job as train_job

    src, out, runs = str(tmp_path / "src"), str(tmp_path / "cache"), tmp_path / "runs"
    put_files(src, good_images(6))
    cache_teacher.main([*TINY, f"source={src}", f"output={out}", "limit=4"])
    pinned = open_cache(out)
    held = f"{tmp_path}/held-out"  # a copy of the session's local cache: this test makes it grow
    shutil.copytree(local_cache.url, held)
    fit = train_job._fit

    def extend_then_fit(*args, **kwargs):
        cache_teacher.main([*TINY, f"source={src}", f"output={out}", "limit=6"])  # a second job extends it
        assert len(open_cache(out)) == 6
        return fit(*args, **kwargs)

    monkeypatch.setattr(train_job, "_fit", extend_then_fit)
    args = [f"cache={out}", f"output={runs}", "name=elastic", "epochs=2", "zero_stage=3", *BASE, f"val_cache={held}"]
    train_student.main([*args, "scaling.num_workers=2", "data.loader_workers=1", "max_steps=1"])
    monkeypatch.setattr(train_job, "_fit", fit)
    _grow(held, out, 2)  # the validation cache grows (by samples of the training cache's, new to it)
    _grow(out, local_cache.url, 3)  # and the training cache again, before the resume
    assert len(open_cache(held)) == len(local_cache.files) + 2
    train_student.main([*args, "scaling.num_workers=1", "data.loader_workers=2"])

    run = runs / "elastic"
    _check_every_sample_once(open_cache(out, version=pinned.version).samples, run, last=(1, 2), validates=True)
    info = _student(str(run))
    assert info["cache_version"] == pinned.version and len(pinned) == 4 and len(open_cache(out)) == 9
    assert info["validation"]["cache"] == held and info["validation"]["ratio"] < 1.5
    vals = [r for r in _metrics(str(run)) if r["kind"] == "val"]
    assert [int(r["samples"]) for r in vals] == [len(local_cache.files)] * 3  # at the start and each epoch's end


def test_a_deepspeed_json_that_contradicts_the_job_is_refused_naming_both(five, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative JSON path, as users give it
    Path("ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 4}))
    with pytest.raises(SystemExit) as refused:
        train_student.main([f"cache={five}", "output=runs", "deepspeed_config=ds.json", "zero_stage=2"])
    message = str(refused.value)
    assert "zero_optimization.stage=3" in message and "zero_stage=2" in message
    assert "train_micro_batch_size_per_gpu=4" in message and "batch_size=1" in message
    assert not (tmp_path / "runs" / "spar-student" / "student.json").exists()
