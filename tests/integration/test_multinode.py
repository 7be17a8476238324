"""The cache and training jobs across a real multi-node Ray cluster on this machine: losing a node, then
a GPU node joining for teacher actors that wait for it."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet  # noqa: F401  (pa.parquet)
import pytest

from pipeline import open_cache, storage
from pipeline.cache import shards
from pipeline.storage import Storage
from tests.images import good_images
from tests.integration.conftest import put_files

pytestmark = pytest.mark.slow  # end to end: left out of the quick loop, `pytest -m "not slow"`

REPO = Path(__file__).resolve().parents[2]
N = 16


def _scenario(args: list[str], log: Path) -> dict:
    # A temp dir of its own (short: Ray's socket paths must fit 107 bytes): the cluster's note of "the
    # current cluster" lands there, never where another test's Ray would read it.
    ray_tmp = tempfile.mkdtemp(prefix="ray-nodes-", dir="/tmp")
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", DS_ACCELERATOR="cpu", RAY_TMPDIR=ray_tmp)
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "tests.integration.multinode", *args], cwd=REPO, env=env,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            shutil.rmtree(ray_tmp, ignore_errors=True)
    line = next(ln for ln in log.read_text().splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_cache_job_survives_losing_a_node_training_runs_across_nodes_and_teachers_wait_for_gpu_nodes(tmp_path):
    """One cluster (a head without CPUs or GPUs, three one-CPU worker nodes), three scenarios in turn:
    the cache job loses a node running a teacher actor mid-job and still commits every key once;
    training then runs its two ranks on the two nodes left; then, with an autoscaler that can add GPU
    nodes, a cache job with default settings asks each teacher actor for a GPU, waits for the node
    that joins after submission, and runs its actors only there."""
    src, out = str(tmp_path / "images"), str(tmp_path / "cache")
    put_files(src, good_images(N))
    gpu_src, gpu_out = str(tmp_path / "gpu-images"), str(tmp_path / "gpu-cache")
    put_files(gpu_src, good_images(4))
    result = _scenario([src, out, str(tmp_path / "runs"), gpu_src, gpu_out], tmp_path / "cluster.log")
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
    info = json.loads((tmp_path / "runs" / "multinode" / "student.json").read_text())
    assert len(set(info["rank_nodes"])) == 2  # the two ranks ran on different nodes
    assert len(set(info["rank_weight_digests"])) == 1 and train["metrics"]["step"] == N // 2

    gpu = result["gpu_join"]
    assert gpu["summary"]["committed_total"] == 4
    assert gpu["actor_nodes"] == [gpu["gpu_node"]]
    keys = open_cache(gpu_out).keys()
    assert len(keys) == len(set(keys)) == 4
