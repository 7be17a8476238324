"""The cache and training jobs across a real multi-node Ray cluster on this machine, losing a node."""
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


def test_cache_job_survives_losing_a_worker_node_then_training_runs_across_nodes(tmp_path):
    src, out = str(tmp_path / "images"), str(tmp_path / "cache")
    put_files(src, good_images(N))
    result = _scenario(["cache_then_train", src, out, str(tmp_path / "runs")], tmp_path / "cluster.log")
    assert result["finished"] and len(result["actor_nodes"]) >= 2  # teacher actors spread over nodes
    assert result["removed"] in result["actor_nodes"] and result["running_at_removal"]
    assert result["committed_at_removal"] < N // 2  # the node died mid-job
    cache = open_cache(out)
    keys = cache.keys()
    assert sorted(keys) == sorted(set(keys)) and len(keys) == N  # every expected key, exactly once
    physical = shards.open_table(Storage(), out).to_pyarrow_table().column("key").to_pylist()  # every row
    assert sorted(set(physical)) == sorted(keys)
    assert cache.verify() == [] and sum(1 for _ in cache) == N

    result = result["train"]  # on the nodes left: the head (no CPU) and two one-CPU workers
    assert result["nodes"] == 3 and result["missing_cache"] == []  # every node sees the local cache path
    assert len(result["missing_elsewhere"]) == 3  # the check really runs on each node
    info = json.loads((tmp_path / "runs" / "multinode" / "student.json").read_text())
    assert len(set(info["rank_nodes"])) == 2  # the two ranks ran on different nodes
    assert len(set(info["rank_weight_digests"])) == 1 and result["metrics"]["step"] == N // 2


def test_teacher_actors_ask_for_gpus_that_the_autoscaler_brings_up_after_submission(tmp_path):
    """A CPU-only head whose autoscaler can add GPU nodes: with default settings the teacher actors
    request a GPU each, wait for the node that joins after submission, and run only there."""
    src, out = str(tmp_path / "images"), str(tmp_path / "cache")
    put_files(src, good_images(4))
    result = _scenario(["gpu_join", src, out], tmp_path / "gpu.log")
    assert result["summary"]["committed_total"] == 4
    assert result["actor_nodes"] == [result["gpu_node"]]
    keys = open_cache(out).keys()
    assert len(keys) == len(set(keys)) == 4
