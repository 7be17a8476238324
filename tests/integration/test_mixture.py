"""Training on a mixture of caches on a real local Ray cluster with DeepSpeed (ZeRO-2, 2 ranks x 2
loader processes): a local cache and one on the S3 server, drawn at chosen proportions (one
repeated, one subsampled), each held out and scored on its own. A worker SIGKILLed mid-epoch and the
command re-run end with the weights of an uninterrupted run, bit for bit (an elastic resume of a
mixture: test_safe_runs.py); an odd draw makes a rank
pad a step, and the weights match a plain PyTorch replay that averages over real samples only;
a cache of another teacher, a resume with another seed or other caches, and a checkpoint replaced
by a pickle are refused before any worker starts."""
from __future__ import annotations

import csv
import io
import json
import pickle
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

import spar
from jobs import cache_teacher, train_student
from pipeline import open_cache
from pipeline.storage import Storage
from pipeline.train.epochs import SampleTable, draw_counts, epoch_order
from pipeline.train.validation import split_manifest
from tests.integration.test_train import _committed_checkpoints, kill_a_worker_after_a_checkpoint

pytestmark = pytest.mark.slow  # end to end: left out of the quick loop, `pytest -m "not slow"`

# 9 draws an epoch: rank 0 trains 5, rank 1 trains 4, then pads a step
MIX = ["epochs=2", "mix=[3,2]", "epoch_samples=9", "val_fraction=0.2", "batch_size=1", "lr=1e-3", "log_every=1",
       "record_keys=true", "zero_stage=2", "scaling.cpus_per_worker=0.5"]
TWO = ["scaling.num_workers=2", "data.loader_workers=2"]


def _rows(run: Path) -> list[dict]:
    out = []
    for url in Storage().list_files(str(run / "keys")):
        out += list(csv.DictReader(io.StringIO(Storage().read_text(url))))
    return [{**r, "epoch": int(r["epoch"]), "step": int(r["step"]), "rank": int(r["rank"]), "cache": int(r["cache"])}
            for r in out]


def _metrics(run: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO((run / "metrics.csv").read_text())))


def _student(run: Path) -> dict:
    return json.loads((run / "student.json").read_text())


def _draws(urls: list[str], versions: list[int], epoch: int) -> Counter:
    """(cache, key) -> times an epoch of the run draws it, from the planner over the caches' training rows."""
    tables = [SampleTable.from_table(split_manifest(open_cache(u, version=v).samples, 0.2, 1000)[0])
              for u, v in zip(urls, versions)]
    table = SampleTable.concat(tables).with_draw(draw_counts([len(t) for t in tables], [3, 2], 9))
    rows = epoch_order(table, seed=0, epoch=epoch)
    return Counter(zip(table.cache_of_rows(rows).tolist(), table.keys_of(rows).to_pylist()))


@pytest.fixture(scope="module")
def mixture(local_cache, s3_cache, tmp_path_factory) -> dict:
    """Two caches of the tiny teacher: the session's local one (5 images) and its S3 one (6 images x 2
    views, another image size), 5 and 4 draws an epoch. Runs: "whole", uninterrupted; "cut", with a
    checkpoint every 2 steps, one of whose workers is SIGKILLed after its first checkpoint (mid-epoch
    0), then re-run."""
    out = tmp_path_factory.mktemp("mixture") / "runs"
    urls = [local_cache.url, s3_cache.url]
    args = [f"cache=[{urls[0]},{urls[1]}]", f"output={out}", *MIX, *TWO]
    train_student.main([*args, "name=whole"])
    args.append("checkpoint_every=2")

    snapshot = str(out / "cut" / "checkpoint_manager_snapshot.json")
    killed = kill_a_worker_after_a_checkpoint([*args, "name=cut", "max_failures=0"], snapshot)
    assert "error" in killed, "the run finished before the kill"
    steps = [c["metrics"]["step"] for c in _committed_checkpoints(snapshot)]
    assert max(steps) < _epoch_steps(out / "whole"), steps  # killed mid-epoch 0: the rerun resumes there
    train_student.main([*args, "name=cut"])  # the same command again: resumes from the last checkpoint

    return {"out": out, "urls": urls, "args": args}


def _epoch_steps(run: Path) -> int:
    return min(int(r["step"]) for r in _metrics(run) if r["kind"] == "epoch")


def test_an_epoch_draws_each_cache_at_its_proportion_and_a_killed_run_resumes_bit_exact(mixture):
    """mix=[3,2], epoch_samples=9: 5 draws of the local cache's 4 training samples and 4 of the S3
    cache's 10 per epoch (one repeated, one subsampled), counted exactly per cache in metrics.csv; every drawn sample once per epoch;
    each cache held out and scored on its own; the killed and re-run run ends with the same weights."""
    out, urls = mixture["out"], mixture["urls"]
    whole, cut = _student(out / "whole"), _student(out / "cut")
    assert cut["rank_weight_digests"] == whole["rank_weight_digests"]  # bit for bit
    assert len(set(whole["rank_weight_digests"])) == 1
    versions = whole["cache_version"]
    assert whole["cache"] == urls and versions == [open_cache(u).version for u in urls]
    training = [c["training_samples"] for c in whole["caches"]]
    draw = draw_counts(training, [3, 2], 9)
    assert training[0] < draw[0] and training[1] > draw[1]  # one repeated, one subsampled
    assert [c["samples_per_epoch"] for c in whole["caches"]] == draw
    assert [c["version"] for c in whole["caches"]] == versions

    rows = _rows(out / "whole")
    for epoch in (0, 1):
        trained = Counter((r["cache"], r["key"]) for r in rows if r["epoch"] == epoch)
        assert trained == _draws(urls, versions, epoch)  # every drawn sample once, exact counts per cache
    metrics = _metrics(out / "whole")
    per_cache = [(int(r["epoch"]), int(r["cache"]), int(r["samples"])) for r in metrics
                 if r["kind"] == "epoch" and r["cache"]]
    assert per_cache == [(e, c, draw[c]) for e in (0, 1) for c in (0, 1)]
    vals = [r for r in metrics if r["kind"] == "val"]
    assert [r["cache"] for r in vals] == ["0", "1", ""] * 3  # at the start and each epoch's end
    for start in range(0, 9, 3):
        assert int(vals[start]["samples"]) + int(vals[start + 1]["samples"]) == int(vals[start + 2]["samples"])
    assert len(whole["validation_by_cache"]) == 2 and whole["validation"]["fraction"] == 0.2
    assert _rows(out / "cut") and (out / "cut" / "loss_curve.png").exists()


def test_caches_of_another_teacher_are_refused_naming_the_field(mixture, local_cache, s3_cache, tmp_path, caplog):
    """A third cache made with another stride: refused before any worker starts, naming it and the
    field; so is a resume of a mixture's run on another list of caches, or another mix."""
    whole = mixture["out"] / "whole"
    before = {p: p.stat().st_mtime_ns for p in whole.rglob("*") if p.is_file()}
    for change in ([f"cache={local_cache.url}"], [f"cache=[{local_cache.url},{s3_cache.url}]", "mix=[1,2]"]):
        caplog.clear()
        with pytest.raises(SystemExit):
            train_student.main([*change, f"output={mixture['out']}", "name=whole", "epochs=3"])
        assert "started on cache=" in caplog.text and "use a new run name" in caplog.text, change
    assert {p: p.stat().st_mtime_ns for p in whole.rglob("*") if p.is_file()} == before

    other = str(tmp_path / "stride32")
    cache_teacher.main(local_cache.argv("stride=32", "limit=1", output=other))
    with pytest.raises(SystemExit):
        train_student.main([f"cache=[{local_cache.url},{s3_cache.url},{other}]", f"output={tmp_path / 'runs'}"])
    assert "cache[2]" in caplog.text and other in caplog.text and "stride: 24 != 32" in caplog.text
    assert "cache[1]" not in caplog.text  # the S3 cache: the same teacher, other images
    assert not (tmp_path / "runs").exists()


def _reference_weights(urls: list[str], rows: list[dict], lr: float) -> dict[str, torch.Tensor]:
    """Plain PyTorch replay of a run from its key log: at each step, the gradient is the mean over
    the step's real samples (whichever ranks had them) of the per-sample MSE gradient; AdamW as the
    job configures it."""
    samples = {(c, s["key"]): s for c, url in enumerate(urls) for s in open_cache(url)}
    model = spar.load_backbone("maskclip-test", pretrained=None)
    spar.set_trainable(model, spar.DEFAULT_TRAINABLE)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4, betas=(0.9, 0.999))
    for step in sorted({r["step"] for r in rows}):
        ids = [(r["cache"], r["key"]) for r in rows if r["step"] == step]
        opt.zero_grad()
        for id_ in ids:
            s = samples[id_]
            pred = model(model.normalize(torch.from_numpy(s["image"])))
            (spar.feature_loss(pred, torch.from_numpy(s["target"])[None]) / len(ids)).backward()
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def test_padding_steps_average_over_real_samples(mixture):
    """Rank 1 pads the 5th step of each epoch: the uninterrupted run matches a plain PyTorch replay;
    student.json records the DeepSpeed config and precision the CPU ranks resolved and ran."""
    out = mixture["out"]
    rows = _rows(out / "whole")
    assert any(len({r["rank"] for r in rows if r["step"] == s}) == 1 for s in range(10))  # a padded step
    reference = _reference_weights(mixture["urls"], rows, lr=1e-3)
    trained = spar.load_backbone("maskclip-test", pretrained=str(out / "whole" / "student.safetensors"))
    for name, value in reference.items():
        ours = trained.get_parameter(name).detach()
        if name.endswith("attn.in_proj_bias"):  # the key bias has a zero gradient (softmax ignores it):
            third = len(value) // 3             # Adam turns its float noise into lr-sized steps, any sign
            ours, value = torch.cat([ours[:third], ours[2 * third:]]), torch.cat([value[:third], value[2 * third:]])
        assert torch.allclose(ours, value, rtol=0, atol=2e-6), name  # halving a padded step's gradient: ~3e-3
    whole = _student(out / "whole")
    assert whole["deepspeed"]["zero_optimization"]["stage"] == 2  # student.json: the DeepSpeed config that ran
    # precision=auto, resolved by the (CPU) ranks into that config, and recorded beside it
    assert whole["precision"] == "fp32" and whole["deepspeed"]["bf16"] == {"enabled": False}
    assert whole["deepspeed"]["fp16"]["enabled"] is False


def test_a_resume_with_another_seed_is_refused_before_any_worker_starts(mixture, tmp_path, caplog):
    """The seed orders every epoch, so a checkpointed run re-run with another seed would re-order the
    samples it already trained: the driver refuses it, naming both seeds, and writes nothing."""
    out = tmp_path / "runs"
    shutil.copytree(mixture["out"] / "cut", out / "cut")  # a run checkpointed with seed=0
    files = {p: p.stat().st_mtime_ns for p in (out / "cut").rglob("*") if p.is_file()}
    args = [a for a in mixture["args"] if not a.startswith("output=")]
    with pytest.raises(SystemExit):
        train_student.main([*args, f"output={out}", "name=cut", "seed=1"])
    assert "was trained with seed=0, this run has seed=1" in caplog.text and "new name=" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in (out / "cut").rglob("*") if p.is_file()} == files


class _Plant:
    """Unpickling this creates `path`: the code a hijacked checkpoint would run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_file_replaced_by_a_pickle_is_refused_and_never_run(mixture, tmp_path, caplog):
    out = tmp_path / "runs"
    shutil.copytree(mixture["out"] / "cut", out / "target")  # a run with checkpoints, to tamper with
    args = [a for a in mixture["args"] if not a.startswith("output=")]
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
        train_student.main([*args, f"output={out}", "name=target"])
    assert not marker.exists(), "the checkpoint's pickle ran"
    assert "refus" in caplog.text and "checkpoint" in caplog.text
