"""Safe training runs on a real local Ray cluster with DeepSpeed: checkpoints that load without
unpickling, exact resume (same layout: bit-identical weights), elastic resume on other numbers of
ranks and loader processes (every sample of the epoch once), gradients averaged over real samples
only, and DeepSpeed JSON files that contradict the job refused."""
from __future__ import annotations

import csv
import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import spar
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
    """Every row of the run's key log (epoch, step, rank, key, loss)."""
    rows = []
    for url in Storage().list_files(storage.join(run_dir, "keys")):
        rows += list(csv.DictReader(io.StringIO(Storage().read_text(url))))
    return [{"epoch": int(r["epoch"]), "step": int(r["step"]), "rank": int(r["rank"]), "key": r["key"],
             "loss": float(r["loss"])} for r in rows]


def _metrics(run_dir: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(Storage().read_text(storage.join(run_dir, "metrics.csv")))))


def _student(run_dir: str) -> dict:
    return json.loads(Storage().read_text(storage.join(run_dir, "student.json")))


def _reference_weights(cache_url: str, rows: list[dict], lr: float) -> dict[str, torch.Tensor]:
    """Plain PyTorch replay of the run from its key log: at each step, the gradient is the mean over
    the step's real samples (whichever ranks had them) of the per-sample MSE gradient; AdamW as the
    job configures it."""
    samples = {s["key"]: s for s in open_cache(cache_url)}
    model = spar.load_backbone("maskclip-test", pretrained=None)
    spar.set_trainable(model, spar.DEFAULT_TRAINABLE)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4, betas=(0.9, 0.999))
    for step in sorted({r["step"] for r in rows}):
        keys = [r["key"] for r in rows if r["step"] == step]
        opt.zero_grad()
        for key in keys:
            s = samples[key]
            pred = model(model.normalize(torch.from_numpy(s["image"])))
            (spar.feature_loss(pred, torch.from_numpy(s["target"])[None]) / len(keys)).backward()
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


PADDING = ["epochs=2", "zero_stage=2", *BASE]  # with 2 ranks x 2 loader processes


@pytest.fixture(scope="module")
def padding_runs(five, tmp_path_factory) -> Path:
    """2 ranks, ZeRO-2, 2 loader processes each, 2 epochs of 3 steps: one run uninterrupted ("whole"),
    one stopped after a step and re-run ("cut"). Their output directory; beside it, in ``branch/``, a
    copy of "cut" as it was after its first step, for the elastic test to resume on other layouts."""
    out = tmp_path_factory.mktemp("padding") / "runs"
    args = [f"cache={five}", f"output={out}", "scaling.num_workers=2", "data.loader_workers=2", *PADDING]
    train_student.main([*args, "name=whole"])
    train_student.main([*args, "name=cut", "max_steps=1"])
    shutil.copytree(out / "cut", out.parent / "branch" / "cut")
    train_student.main([*args, "name=cut"])
    return out


def test_padding_steps_average_over_real_samples_and_resume_is_bit_exact(five, padding_runs):
    """Rank 1 pads the 3rd step of each epoch. The uninterrupted run matches a plain PyTorch replay;
    the run stopped after one step and re-run ends with the very same weights."""
    out = padding_runs
    whole, cut = _student(str(out / "whole")), _student(str(out / "cut"))
    assert whole["steps"] == cut["steps"] == 6
    assert cut["rank_weight_digests"] == whole["rank_weight_digests"]  # bit-exact resume

    rows = _keys(str(out / "whole"))
    assert sorted(r["key"] for r in rows if r["epoch"] == 0) == sorted(open_cache(five).keys())
    assert any(len({r["rank"] for r in rows if r["step"] == s}) == 1 for s in range(6))  # a padded step
    reference = _reference_weights(five, rows, lr=1e-3)
    trained = spar.load_backbone("maskclip-test", pretrained=str(out / "whole" / "student.safetensors"))
    for name, value in reference.items():
        ours = trained.get_parameter(name).detach()
        if name.endswith("attn.in_proj_bias"):  # the key bias has a zero gradient (softmax ignores it):
            third = len(value) // 3             # Adam turns its float noise into lr-sized steps, any sign
            ours, value = torch.cat([ours[:third], ours[2 * third:]]), torch.cat([value[:third], value[2 * third:]])
        assert torch.allclose(ours, value, rtol=0, atol=2e-6), name  # halving a padded step's gradient: ~3e-3
    assert whole["deepspeed"]["zero_optimization"]["stage"] == 2  # student.json: the DeepSpeed config that ran
    # precision=auto, resolved by the (CPU) ranks into that config, and recorded beside it
    assert whole["precision"] == "fp32" and whole["deepspeed"]["bf16"] == {"enabled": False}
    assert whole["deepspeed"]["fp16"]["enabled"] is False


def test_a_resume_with_another_seed_is_refused_before_any_worker_starts(five, padding_runs, tmp_path, caplog):
    """The seed orders every epoch, so a checkpointed run re-run with another seed would re-order the
    samples it already trained: the driver refuses it, naming both seeds, and writes nothing."""
    import shutil

    out = tmp_path / "runs"
    shutil.copytree(padding_runs / "cut", out / "cut")  # a run checkpointed with seed=0
    files = {p: p.stat().st_mtime_ns for p in (out / "cut").rglob("*") if p.is_file()}
    with pytest.raises(SystemExit):
        train_student.main([f"cache={five}", f"output={out}", "name=cut", "epochs=2", "scaling.num_workers=2",
                            "zero_stage=2", "data.loader_workers=2", *BASE, "seed=1"])
    assert "was trained with seed=0, this run has seed=1" in caplog.text and "new name=" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in (out / "cut").rglob("*") if p.is_file()} == files


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


def test_a_resume_on_more_ranks_and_loader_processes_sees_every_sample_once(five, padding_runs):
    """ZeRO-2, from the padding test's run checkpointed after one step on 2 ranks x 2 loader processes:
    the rest on 3 ranks x 3 loader processes. (The ZeRO-3 test below resumes on fewer ranks.)"""
    run = padding_runs.parent / "branch" / "cut"
    args = [f"cache={five}", f"output={run.parent}", "name=cut", *PADDING]
    train_student.main([*args, "scaling.num_workers=3", "data.loader_workers=3"])
    _check_every_sample_once(open_cache(five).samples, run, last=(3, 3))


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


class _Plant:
    """Unpickling this creates `path`: the code a hijacked checkpoint would run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_file_replaced_by_a_pickle_is_refused_and_never_run(five, padding_runs, tmp_path, caplog):
    out = tmp_path / "runs"
    shutil.copytree(padding_runs / "cut", out / "target")  # a run with checkpoints, to tamper with
    args = [f"cache={five}", f"output={out}", "name=target", "epochs=2", "scaling.num_workers=2",
            "data.loader_workers=2", *BASE]
    checkpoints = sorted(p for p in (out / "target").glob("checkpoint_*") if p.is_dir())
    assert checkpoints
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Plant(str(marker)))
    for ckpt in checkpoints:
        files = [p for p in ckpt.rglob("*") if p.is_file()]
        assert files
        for path in files:  # every file the checkpoint holds, whatever its format claims to be
            path.write_bytes(payload)
        # and the file DeepSpeed's own loader would unpickle first
        (ckpt / "ds").mkdir(exist_ok=True)
        (ckpt / "ds" / "mp_rank_00_model_states.pt").write_bytes(payload)
    with pytest.raises(SystemExit):
        train_student.main(args)
    assert not marker.exists(), "the checkpoint's pickle ran"
    assert "refus" in caplog.text and "checkpoint" in caplog.text


def test_a_deepspeed_json_that_contradicts_the_job_is_refused_naming_both(five, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative JSON path, as users give it
    Path("ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 4}))
    with pytest.raises(SystemExit) as refused:
        train_student.main([f"cache={five}", "output=runs", "deepspeed_config=ds.json", "zero_stage=2"])
    message = str(refused.value)
    assert "zero_optimization.stage=3" in message and "zero_stage=2" in message
    assert "train_micro_batch_size_per_gpu=4" in message and "batch_size=1" in message
    assert not (tmp_path / "runs" / "spar-student" / "student.json").exists()
