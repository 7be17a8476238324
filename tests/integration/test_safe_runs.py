"""Safe training runs on a real local Ray cluster with DeepSpeed: a ZeRO-3 run on a mixture of caches
resumed on fewer ranks and more loader processes reads its pinned cache versions while the caches
grow (every draw of the epoch once), and DeepSpeed JSON files that contradict the job are refused.
(Exact resume after a SIGKILL, padding steps and refused checkpoints: test_mixture.py.)"""
from __future__ import annotations

import csv
import io
from collections import Counter
import json
import shutil
from pathlib import Path

import pytest

from jobs import cache_teacher, train_student
from pipeline import open_cache, storage
from pipeline.cache import shards
from pipeline.cache.reader import iter_raw_shard
from pipeline.storage import Storage
from pipeline.train.epochs import SampleTable, draw_counts, epoch_order, plan_epoch
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
             "loss": float(r["loss"]), "cache": int(r["cache"])} for r in rows]


def _metrics(run_dir: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(Storage().read_text(storage.join(run_dir, "metrics.csv")))))


def _student(run_dir: str) -> dict:
    return json.loads(Storage().read_text(storage.join(run_dir, "student.json")))


def _check_draws(urls: list[str], versions: list[int], mix: tuple, run: Path, last: tuple[int, int],
                 validates: bool = False) -> None:
    """Each epoch trained exactly the draws the planner makes of the caches at `urls` pinned at
    `versions` (``mix``: (weights, epoch_samples), or () for every sample once): epoch 0 each draw once
    (none of its tail skipped, none repeated), and its row reports the loss of all of them; epoch 1
    followed the plan of an uninterrupted run on the `last` layout (ranks, loader processes). A run that
    `validates` scored its baseline once, whatever the resumes."""
    tables = [SampleTable.from_table(open_cache(u, version=v).samples) for u, v in zip(urls, versions)]
    table = SampleTable.concat(tables)
    if mix:
        table = table.with_draw(draw_counts([len(t) for t in tables], *mix))
    rows = _keys(str(run))
    epoch0 = [r for r in rows if r["epoch"] == 0]
    order = epoch_order(table, seed=0, epoch=0)
    drawn = Counter(zip(table.cache_of_rows(order).tolist(), table.keys_of(order).to_pylist()))
    assert Counter((r["cache"], r["key"]) for r in epoch0) == drawn  # each once: none skipped, none repeated
    epochs = [r for r in _metrics(str(run)) if r["kind"] == "epoch" and not r["cache"]]
    assert [int(r["epoch"]) for r in epochs] == [0, 1]
    vals = [int(r["step"]) for r in _metrics(str(run)) if r["kind"] == "val"]
    if validates:
        assert vals[0] == 0 and vals.count(0) == 1
    assert [int(r["samples"]) for r in epochs] == [table.epoch_length] * 2
    true_loss = sum(r["loss"] for r in epoch0) / len(epoch0)  # batch_size=1: one row per batch
    assert float(epochs[0]["loss"]) == pytest.approx(true_loss, rel=1e-5)

    ranks, loaders = last
    for rank in range(ranks):
        plan = plan_epoch(table, seed=0, epoch=1, rank=rank, world_size=ranks, workers=loaders, batch_size=1,
                          shuffle_buffer=8)
        planned = [(c, k) for w, j in plan.order() for c, k in
                   zip(plan.workers[w].batch_caches(j), plan.workers[w].batch(j))]
        trained = [(r["cache"], r["key"]) for r in sorted(rows, key=lambda r: r["step"])
                   if r["epoch"] == 1 and r["rank"] == rank]
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


def test_a_zero3_mixture_resumed_on_fewer_ranks_draws_its_pinned_versions_while_the_caches_grow(
        local_cache, s3_cache, tmp_path, monkeypatch):
    """ZeRO-3 (parameters sharded too) on a mixture: a local cache of 4 samples at the start and the
    session's S3 cache (12), ``mix=[2,1] epoch_samples=7``: 5 draws of the first (repeated) and 2 of
    the second (subsampled) an epoch. Checkpointed after one step on 2 ranks x 1 loader process and
    resumed on a single rank x 2: epoch 0 trains each draw once, epoch 1 follows the new layout's plan.
    Meanwhile the caches grow: a second cache job extends the local cache after the driver pinned
    its version and before the workers read it, and another writer commits to it before the resume;
    the run reads exactly its pinned samples, from start to resume. With ``val_cache=`` (another cache
    by the same teacher; 5 samples: uneven rank shares) nothing of the training caches is held out, and
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
    mixture = [f"cache=[{out},{s3_cache.url}]", "mix=[2,1]", "epoch_samples=7"]
    args = [*mixture, f"output={runs}", "name=elastic", "epochs=2", "zero_stage=3", *BASE, f"val_cache={held}"]
    train_student.main([*args, "scaling.num_workers=2", "data.loader_workers=1", "max_steps=1"])
    monkeypatch.setattr(train_job, "_fit", fit)
    _grow(held, out, 2)  # the validation cache grows (by samples of the training cache's, new to it)
    _grow(out, local_cache.url, 3)  # and the training cache again, before the resume
    assert len(open_cache(held)) == len(local_cache.files) + 2
    train_student.main([*args, "scaling.num_workers=1", "data.loader_workers=2"])

    run = runs / "elastic"
    versions = [pinned.version, open_cache(s3_cache.url).version]
    _check_draws([out, s3_cache.url], versions, ([2, 1], 7), run, last=(1, 2), validates=True)
    info = _student(str(run))
    assert info["cache_version"] == versions and len(pinned) == 4 and len(open_cache(out)) == 9
    assert [c["samples_per_epoch"] for c in info["caches"]] == [5, 2]
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
