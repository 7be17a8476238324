"""The training job on a real local Ray cluster: 2 ranks, gloo, DeepSpeed ZeRO-2, S3 checkpoints."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import open_clip
import pytest
import torch

import spar
from jobs import train_student
from pipeline import open_cache, storage
from pipeline.cache import shards
from pipeline.cache.reader import FORMAT
from pipeline.codecs import load_npy
from pipeline.storage import Storage

pytestmark = pytest.mark.slow  # end to end: left out of the quick loop, `pytest -m "not slow"`

TRAIN = ["scaling.num_workers=2", "zero_stage=2", "lr=1e-3", "data.loader_workers=1", "log_every=2",
         "scaling.cpus_per_worker=0.5"]


def _committed_checkpoints(snapshot: str) -> list:
    """Checkpoints Ray Train has committed (its snapshot file may be mid-write: then none yet)."""
    try:
        return json.loads(Storage().read_text(snapshot)).get("checkpoint_results", [])
    except (OSError, ValueError):
        return []


def _csv_rows(run_dir: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(Storage().read_text(storage.join(run_dir, "metrics.csv")))))


@pytest.fixture(scope="module")
def caches(s3_cache):
    """The root of the session's training cache on the S3 server (``<root>/cache``: 6 images x 2 views)."""
    return s3_cache.url.rsplit("/", 1)[0]


@pytest.fixture(scope="module")
def trained(caches):
    """Train 4 epochs with 2 ranks; checkpoints go to S3."""
    out = f"{caches}/runs"
    metrics = train_student.main([f"cache={caches}/cache", f"output={out}", "name=tiny", "epochs=4", "record_keys=true",
                                  *TRAIN])
    return {"root": caches, "out": out, "run_dir": f"{out}/tiny", "metrics": metrics}


def test_loss_decreases_and_ranks_agree(trained):
    info = json.loads(Storage().read_text(storage.join(trained["run_dir"], "student.json")))
    epochs = [float(r["loss"]) for r in _csv_rows(trained["run_dir"]) if r["kind"] == "epoch"]
    assert len(epochs) == 4 and epochs[-1] < epochs[0]
    assert len(info["rank_weight_digests"]) == 2 and len(set(info["rank_weight_digests"])) == 1
    assert info["steps"] == trained["metrics"]["step"] == 4 * 5  # 12 samples, 2 held out, / 2 ranks per epoch
    assert info["cache_fingerprint"] == open_cache(f"{trained['root']}/cache").fingerprint["fingerprint"]


def test_validation_holds_out_whole_source_images_and_scores_them_at_every_epoch(trained):
    """Whole source images are held out, never trained, and scored against the untrained baseline at
    each epoch's end. (Whether the student gets closer is asserted on the 5 other images of the
    session's local cache, by the same teacher, in
    `test_distillation_beats_the_untrained_single_pass_on_held_out_images`: one held-out image after
    20 steps is too few to say either way.)"""
    from pipeline.train.validation import held_out, source_of

    cache = open_cache(f"{trained['root']}/cache")
    held = held_out(cache.keys(), 0.02)
    assert len(held) == 2 and len({source_of(k) for k in held}) == 1  # one image, both its views
    trained_keys = set()
    for url in Storage().list_files(storage.join(trained["run_dir"], "keys")):
        trained_keys |= {line.split(",")[3] for line in Storage().read_text(url).splitlines()[1:]}
    assert trained_keys == set(cache.keys()) - held  # every rank, every epoch: never a held-out sample
    rows = [r for r in _csv_rows(trained["run_dir"]) if r["kind"] == "val"]
    assert [int(r["step"]) for r in rows] == [0, 5, 10, 15, 20]  # the baseline, then each epoch's end
    assert all(int(r["samples"]) == 2 for r in rows) and float(rows[0]["val_ratio"]) == 1.0
    info = json.loads(Storage().read_text(storage.join(trained["run_dir"], "student.json")))["validation"]
    assert info["fraction"] == 0.02 and info["mse"] == pytest.approx(float(rows[-1]["val_mse"]), rel=1e-5)
    baseline = float(rows[0]["val_mse"])
    assert info["ratio"] == pytest.approx(info["mse"] / baseline, rel=1e-5)  # over the untrained single pass


def test_checkpoints_and_artifacts_land_on_s3(trained):
    files = [u.rsplit("/", 1)[1] for u in Storage().list_files(trained["run_dir"])]
    assert any("checkpoint_" in u for u in Storage().list_files(trained["run_dir"]))
    for name in ("student.safetensors", "student.json", "metrics.csv", "loss_curve.png", "config.yaml"):
        assert name in files
    assert any(f.startswith("events.out.tfevents") for f in files)


def test_a_run_through_a_fault_storm_ends_with_the_same_weights(trained, s3_endpoint):
    """The same run with every request to S3 (manifest, shards, checkpoints, metrics, key records)
    going through a proxy that fails 10% of them, every fault kind, credentials in
    ``storage_options``: the data order is deterministic and every read is retried in place, so
    the student is the same, bit for bit."""
    from safetensors.numpy import load

    from pipeline.bench.s3proxy import FaultyProxy

    root = trained["root"]
    with FaultyProxy(s3_endpoint, faults=0.1, seed=12) as proxy:
        storm = train_student.main([f"cache={root}/cache", f"output={root}/storm", "name=tiny", "epochs=4",
                                    "record_keys=true", *TRAIN, f"storage_options.endpoint_url={proxy.endpoint}",
                                    "storage_options.key=testing", "storage_options.secret=testing",
                                    "storage_options.retry.max_backoff_s=1"])
        proxy.set_faults(0.0)
        faults = proxy.faults()
    assert sum(faults.values()) >= 10 and len(faults) >= 4, faults
    calm, stormy = (load(Storage().read_bytes(f"{run}/student.safetensors"))
                    for run in (trained["run_dir"], f"{root}/storm/tiny"))
    assert calm.keys() == stormy.keys() and all((calm[k] == stormy[k]).all() for k in calm)
    assert storm["loss"] == trained["metrics"]["loss"]
    rows = _csv_rows(f"{root}/storm/tiny")
    assert [r["step"] for r in rows if r["kind"] == "step"] == [r["step"] for r in _csv_rows(trained["run_dir"])
                                                               if r["kind"] == "step"]
    assert all(r["storage_retries"] != "" for r in rows if r["kind"] == "step")


def test_exported_student_reproduces_in_job_features(trained, tmp_path):
    run_dir = trained["run_dir"]
    info = json.loads(Storage().read_text(storage.join(run_dir, "student.json")))
    local = tmp_path / "student.safetensors"
    Storage().download(storage.join(run_dir, "student.safetensors"), str(local))
    in_job = load_npy(Storage().read_bytes(storage.join(run_dir, "probe_features.npy")))
    probe = next(s for s in open_cache(f"{trained['root']}/cache") if s["key"] == info["probe_key"])
    bb = spar.load_backbone("maskclip-test", pretrained=str(local))
    with torch.no_grad():
        ours = bb.dense(bb.normalize(torch.from_numpy(probe["image"]))).numpy()
    assert np.abs(ours - in_job).max() < 1e-5
    plain = open_clip.create_model("spar-test-maskclip", pretrained=str(local))  # plain open_clip loads it
    assert torch.equal(plain.visual.conv1.weight, bb.clip.visual.conv1.weight)
    teacher = spar.load_backbone("maskclip-test", pretrained=None)
    assert not torch.equal(teacher.blocks[-1].mlp.c_fc.weight, bb.blocks[-1].mlp.c_fc.weight)
    assert torch.equal(teacher.blocks[0].mlp.c_fc.weight, bb.blocks[0].mlp.c_fc.weight)  # frozen stays


def test_distillation_beats_the_untrained_single_pass_on_held_out_images(trained, local_cache, tmp_path):
    """On images it never trained on (the session's local cache: 5 other images, the same teacher)."""
    held = open_cache(local_cache.url)
    assert held.fingerprint["fingerprint"] == open_cache(f"{trained['root']}/cache").fingerprint["fingerprint"]
    local = tmp_path / "student.safetensors"
    Storage().download(storage.join(trained["run_dir"], "student.safetensors"), str(local))
    student = spar.load_backbone("maskclip-test", pretrained=str(local))
    untrained = spar.load_backbone("maskclip-test", pretrained=None)
    mse_student, mse_untrained = [], []
    with torch.no_grad():
        for s in held:
            x = untrained.normalize(torch.from_numpy(s["image"]))
            target = torch.from_numpy(s["target"])[None]
            mse_student.append(float(spar.feature_loss(student.dense(x), target)))
            mse_untrained.append(float(spar.feature_loss(untrained.dense(x), target)))
    ratio = np.mean(mse_student) / np.mean(mse_untrained)
    print(f"held-out MSE student / untrained single pass = {ratio:.3f}")
    assert ratio < 1.0


@pytest.mark.parametrize("args,msg", [
    (["backbone=siglip2-test"], "the student must start from the teacher"),
])
def test_mismatched_backbone_is_refused(caches, args, msg, caplog):
    with pytest.raises(SystemExit):
        train_student.main([f"cache={caches}/cache", f"output={caches}/nope", *args])
    assert msg in caplog.text


def test_mismatched_weights_are_refused(caches, tmp_path, caplog):
    other = spar.export_open_clip(spar.load_backbone("maskclip-test", pretrained=None, init_seed=7),
                                  tmp_path / "other.safetensors")
    with pytest.raises(SystemExit):
        train_student.main([f"cache={caches}/cache", f"output={caches}/nope", f"pretrained={other}"])
    assert "cache's teacher used random" in caplog.text


def test_missing_and_empty_caches_are_clear_errors(tmp_path, caplog):
    with pytest.raises(SystemExit):
        train_student.main([f"cache={tmp_path / 'nothing'}", f"output={tmp_path / 'o'}"])
    assert "is not a teacher cache" in caplog.text
    empty = tmp_path / "empty"
    shards.write_json(Storage(), str(empty / "teacher.json"), {"format": FORMAT})
    with pytest.raises(SystemExit):
        train_student.main([f"cache={empty}", f"output={tmp_path / 'o'}"])
    assert "holds no committed samples" in caplog.text
    with pytest.raises(SystemExit, match="cache="):
        train_student.main([])


def _train_workers(since: float) -> list:
    """The Ray Train worker processes started after `since`, not their forked data loaders (the tests
    run one training job at a time; a finished run's workers may linger a moment)."""
    import psutil

    found = {}  # pid -> (process, parent pid)
    for p in psutil.process_iter():
        try:
            if p.name() == "ray::RayTrainWorker" and p.create_time() >= since:
                found[p.pid] = (p, p.ppid())
        except psutil.Error:
            pass
    # a data loader the worker has just forked still carries its name until it renames itself
    return [p for p, parent in found.values() if parent not in found]


def kill_a_worker_after_a_checkpoint(argv: list[str], snapshot: str, after_step: int = -1) -> dict:
    """Run the training job `argv` in a thread; once it has committed a checkpoint past `after_step`,
    SIGKILL one of its 2 Ray Train workers; wait for the job to end. Returns ``metrics`` (the job's
    result) or ``error`` (what it raised)."""
    import os
    import signal
    import threading
    import time

    outcome: dict = {}

    def run():
        try:
            outcome["metrics"] = train_student.main(argv)
        except BaseException as e:  # SystemExit: the job's own exit
            outcome["error"] = e

    def steps():
        return [c.get("metrics", {}).get("step", 0) for c in _committed_checkpoints(snapshot)]

    job = threading.Thread(target=run)
    started = time.time()
    job.start()
    try:
        deadline = time.monotonic() + 300
        while max(steps(), default=-1) <= after_step:
            assert job.is_alive(), "the run ended before it committed a checkpoint"
            assert time.monotonic() < deadline, "no committed checkpoint within 300 s"
            time.sleep(0.1)
        workers = _train_workers(since=started)
        assert len(workers) == 2, workers
        os.kill(workers[-1].pid, signal.SIGKILL)
    finally:
        job.join(timeout=600)
    assert not job.is_alive()
    return outcome


def test_a_rerun_continues_from_the_checkpoint_and_a_killed_worker_from_the_last_one(trained):
    """The same command with more epochs continues the finished run from its last checkpoint on S3.
    One of its Ray Train workers is SIGKILLed after a checkpoint the rerun committed: the group
    restarts from that checkpoint and finishes. Every step is trained once per rank (a restart from
    an older checkpoint would train some twice), metrics.csv gains the new steps once each, and the
    held-out split stays the one the run started with."""
    from pipeline.train.validation import held_out

    run_dir = trained["run_dir"]
    before = json.loads(Storage().read_text(storage.join(run_dir, "student.json")))["steps"]
    snapshot = storage.join(run_dir, "checkpoint_manager_snapshot.json")
    args = [f"cache={trained['root']}/cache", f"output={trained['out']}", "name=tiny", "epochs=6", "checkpoint_every=5",
            "max_failures=2", "record_keys=true", *TRAIN]
    result = kill_a_worker_after_a_checkpoint(args, snapshot, after_step=before)
    assert result["metrics"]["step"] == before + 2 * 5  # two more epochs, not six
    info = json.loads(Storage().read_text(storage.join(run_dir, "student.json")))
    assert info["steps"] == 6 * 5 and len(set(info["rank_weight_digests"])) == 1

    steps = [int(r["step"]) for r in _csv_rows(run_dir) if r["kind"] == "step"]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) and steps[-1] == 6 * 5  # appended once each
    cache = open_cache(f"{trained['root']}/cache")
    rows = []
    for url in Storage().list_files(storage.join(run_dir, "keys")):
        rows += [line.split(",") for line in Storage().read_text(url).splitlines()[1:]]
    trained_steps = [(int(step), int(rank)) for _, step, rank, _, _, _ in rows]
    assert len(trained_steps) == len(set(trained_steps))  # each step once per rank: resumed from the last checkpoint
    assert {int(step) for _, step, _, _, _, _ in rows} == set(range(6 * 5))
    assert {key for _, _, _, key, _, _ in rows} == set(cache.keys()) - held_out(cache.keys(), 0.02)  # the same split
    assert {cache for *_, cache in rows} == {"0"}  # one cache: its index in cache=
