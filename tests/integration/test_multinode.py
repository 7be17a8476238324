"""The cache and training jobs across a real multi-node Ray cluster on this machine: losing a node, then
a GPU node joining for teacher actors that wait for it."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline import open_cache
from pipeline.cache import shards
from pipeline.storage import Storage
from tests.images import good_images
from tests.integration.conftest import put_files

pytestmark = pytest.mark.slow  # end to end: left out of the quick loop, `pytest -m "not slow"`

REPO = Path(__file__).resolve().parents[2]
N = 16


_RUN: dict = {}  # the scenario's process, once started


def start_early() -> None:
    """Start the scenario's process now (tests/conftest.py calls this with the session's first
    integration test when this module's test is selected). It runs its own cluster: ~90 s of both
    cores alone (150 CPU-seconds). Started early, at a lower priority (nice 10), it takes the CPU the
    integration tests before it leave idle while they wait on processes and clusters, and never
    slows them much; its test then waits for what is left, if anything."""
    if _RUN:
        return
    # Its own temp dirs: files it reads and writes, and Ray's (short: Ray's socket paths must fit 107
    # bytes), where the cluster's note of "the current cluster" lands, never where another test's Ray reads it.
    root = Path(tempfile.mkdtemp(prefix="spar-multinode-"))
    ray_tmp = tempfile.mkdtemp(prefix="ray-nodes-", dir="/tmp")
    put_files(str(root / "images"), good_images(N))
    put_files(str(root / "gpu-images"), good_images(4))
    args = [str(root / name) for name in ("images", "cache", "runs", "gpu-images", "gpu-cache")]
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", DS_ACCELERATOR="cpu", RAY_TMPDIR=ray_tmp)
    log = root / "cluster.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "tests.integration.multinode", *args], cwd=REPO, env=env,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: os.nice(10))  # its cluster's processes inherit it
    _RUN.update(root=root, ray_tmp=ray_tmp, log=log, proc=proc)
    atexit.register(_abandon)


def _stop() -> None:
    proc = _RUN["proc"]
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    shutil.rmtree(_RUN["ray_tmp"], ignore_errors=True)


def _abandon() -> None:
    """A session that ends before the test has read the result (a failure with -x, Ctrl-C) takes the
    scenario down, and its files."""
    if not _RUN.get("waited"):
        _stop()
        shutil.rmtree(_RUN["root"], ignore_errors=True)


def _result() -> tuple[Path, dict]:
    """The scenario's files and what it printed, once it has ended (started now if not yet)."""
    start_early()
    proc, log, _RUN["waited"] = _RUN["proc"], _RUN["log"], True
    try:
        assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    finally:
        _stop()
    line = next(ln for ln in log.read_text().splitlines() if ln.startswith("RESULT "))
    return _RUN["root"], json.loads(line[len("RESULT "):])


def test_cache_job_survives_losing_a_node_training_runs_across_nodes_and_teachers_wait_for_gpu_nodes():
    """One cluster (a head without CPUs or GPUs, three one-CPU worker nodes), three scenarios in turn:
    the cache job loses a node running a teacher actor mid-job and still commits every key once;
    training then runs its two ranks on the two nodes left; then, with an autoscaler that can add GPU
    nodes, a cache job with default settings asks each teacher actor for a GPU, waits for the node
    that joins after submission, and runs its actors only there. (It runs in a process of its own,
    started with the session's first integration test, at a lower priority: `start_early`.)"""
    root, result = _result()
    out, gpu_out = str(root / "cache"), str(root / "gpu-cache")
    assert result["finished"] and len(result["actor_nodes"]) >= 2  # teacher actors spread over nodes
    assert result["removed"] in result["actor_nodes"] and result["running_at_removal"]
    assert result["committed_at_removal"] < N // 2  # the node died mid-job
    cache = open_cache(out)
    keys = cache.keys()
    assert sorted(keys) == sorted(set(keys)) and len(keys) == N  # every expected key, exactly once
    physical = shards.open_table(Storage(), out).to_pyarrow_table().column("key").to_pylist()  # every row
    assert sorted(set(physical)) == sorted(keys)
    assert cache.verify() == [] and sum(1 for _ in cache) == N

    train = result["train"]  # on the nodes left: the head (no CPU) and two one-CPU workers
    assert train["nodes"] == 3 and train["missing_cache"] == []  # every node sees the local cache path
    assert len(train["missing_elsewhere"]) == 3  # the check really runs on each node
    info = json.loads((root / "runs" / "multinode" / "student.json").read_text())
    assert len(set(info["rank_nodes"])) == 2  # the two ranks ran on different nodes
    assert len(set(info["rank_weight_digests"])) == 1 and train["metrics"]["step"] == N // 2

    gpu = result["gpu_join"]
    assert gpu["summary"]["committed_total"] == 4
    assert gpu["actor_nodes"] == [gpu["gpu_node"]]
    keys = open_cache(gpu_out).keys()
    assert len(keys) == len(set(keys)) == 4
    shutil.rmtree(root, ignore_errors=True)  # kept when an assertion fails, to read
