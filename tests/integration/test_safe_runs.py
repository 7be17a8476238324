"""Safe training runs on a real local Ray cluster with DeepSpeed: checkpoints that load without
unpickling, exact resume (same layout: bit-identical weights), elastic resume on another number of
ranks (every sample of the epoch once), gradients averaged over real samples only, and DeepSpeed
JSON files that contradict the job refused."""
from __future__ import annotations

import csv
import io
import json
import pickle
from pathlib import Path

import pytest
import torch

import spar
from jobs import cache_teacher, train_student
from pipeline import open_cache, storage
from pipeline.storage import Storage
from pipeline.train import loader
from pipeline.train.validation import split_manifest
from tests.images import good_images
from tests.integration.conftest import put_files
from tests.integration.test_cache_job import TINY

BASE = ["batch_size=1", "lr=1e-3", "log_every=1", "record_keys=true", "scaling.cpus_per_worker=0.5",
        "checkpoint_every=1", "val_fraction=0"]  # every sample trains: the tests count them


def _cache(root: Path, n: int) -> str:
    put_files(str(root / "src"), good_images(n, seed=11))
    cache_teacher.main([*TINY, f"source={root / 'src'}", f"output={root / 'cache'}"])
    return str(root / "cache")


@pytest.fixture(scope="module")
def five(ray_cluster, tmp_path_factory):
    """5 samples: on 2 ranks, rank 0 trains 3 per epoch and rank 1 trains 2, then pads."""
    return _cache(tmp_path_factory.mktemp("five"), 5)


@pytest.fixture(scope="module")
def six(ray_cluster, tmp_path_factory):
    return _cache(tmp_path_factory.mktemp("six"), 6)


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


def test_padding_steps_average_over_real_samples_and_resume_is_bit_exact(five, tmp_path):
    """2 ranks, ZeRO-2, 2 loader processes each, 2 epochs of 3 steps; rank 1 pads the 3rd step.
    An uninterrupted run matches a plain PyTorch replay; a run stopped after one step and re-run
    ends with the very same weights."""
    out = tmp_path / "runs"
    args = [f"cache={five}", f"output={out}", "epochs=2", "scaling.num_workers=2", "zero_stage=2",
            "data.loader_workers=2", *BASE]
    train_student.main([*args, "name=whole"])
    train_student.main([*args, "name=cut", "max_steps=1"])
    train_student.main([*args, "name=cut"])
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


@pytest.mark.parametrize("before,after,zero", [(2, 3, 2), (3, 2, 3)])
def test_elastic_resume_sees_every_sample_of_the_epoch_once(six, tmp_path, before, after, zero):
    """Checkpointed mid-epoch on `before` ranks (1 loader process each), resumed on `after` ranks with
    2 loader processes: epoch 0 trains each of its samples once, its row reports the loss of all of
    them, and epoch 1 follows the plan of an uninterrupted `after`-rank run."""
    run = tmp_path / "runs" / "elastic"
    args = [f"cache={six}", f"output={tmp_path / 'runs'}", "name=elastic", "epochs=2", f"zero_stage={zero}", *BASE,
            "val_fraction=0.02"]  # one image held out: validation runs on uneven rank shares too
    train_student.main([*args, f"scaling.num_workers={before}", "data.loader_workers=1", "max_steps=1"])
    train_student.main([*args, f"scaling.num_workers={after}", "data.loader_workers=2"])

    rows = _keys(str(run))
    train_rows, _ = split_manifest(open_cache(six).manifest, 0.02)
    keys = train_rows.column("key").to_pylist()
    epoch0 = [r for r in rows if r["epoch"] == 0]
    assert sorted(r["key"] for r in epoch0) == sorted(keys)  # each once: none skipped, none repeated
    epochs = [r for r in _metrics(str(run)) if r["kind"] == "epoch"]
    assert [int(r["epoch"]) for r in epochs] == [0, 1]
    assert [int(r["step"]) for r in _metrics(str(run)) if r["kind"] == "val"][0] == 0  # the baseline, once
    assert int(epochs[0]["samples"]) == len(keys)
    true_loss = sum(r["loss"] for r in epoch0) / len(epoch0)  # batch_size=1: one row per batch
    assert float(epochs[0]["loss"]) == pytest.approx(true_loss, rel=1e-5)

    refs = loader.manifest_refs(train_rows)
    for rank in range(after):
        plan = loader.plan_epoch(refs, seed=0, epoch=1, rank=rank, world_size=after, workers=2, batch_size=1,
                                 shuffle_buffer=8)
        planned = [ref.key for batch in plan.ordered_batches() for ref in batch]
        trained = [r["key"] for r in sorted(rows, key=lambda r: r["step"]) if r["epoch"] == 1 and r["rank"] == rank]
        assert trained == planned, rank


def test_a_resume_with_more_loader_processes_trains_the_rest_of_the_epoch_and_reports_its_true_loss(six, tmp_path):
    """One rank stopped half way through an epoch with one loader process, resumed with two: the
    epoch trains each sample once (none of its tail skipped) and its row is the mean over all of
    its batches, before and after the resume."""
    run = tmp_path / "runs" / "loaders"
    args = [f"cache={six}", f"output={tmp_path / 'runs'}", "name=loaders", "epochs=1", "scaling.num_workers=1", *BASE]
    train_student.main([*args, "data.loader_workers=1", "max_steps=3"])
    train_student.main([*args, "data.loader_workers=2"])
    rows, problems = _keys(str(run)), []
    if sorted(r["key"] for r in rows) != sorted(open_cache(six).keys()):
        problems.append(f"epoch 0 trained {sorted(r['key'] for r in rows)}")
    epochs = [r for r in _metrics(str(run)) if r["kind"] == "epoch"]
    true_loss = sum(r["loss"] for r in rows) / len(rows)
    if len(epochs) != 1 or float(epochs[0]["loss"]) != pytest.approx(true_loss, rel=1e-5):
        problems.append(f"epoch rows {[(r['loss'], r['samples']) for r in epochs]}, true loss {true_loss:.6g}")
    assert not problems, problems


class _Plant:
    """Unpickling this creates `path`: the code a hijacked checkpoint would run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_file_replaced_by_a_pickle_is_refused_and_never_run(five, tmp_path, caplog):
    out = tmp_path / "runs"
    args = [f"cache={five}", f"output={out}", "name=target", "epochs=2", "scaling.num_workers=1",
            "data.loader_workers=1", *BASE]
    train_student.main([*args, "max_steps=2"])
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
