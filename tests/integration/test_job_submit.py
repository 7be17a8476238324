"""`ray start --head` on 127.0.0.1, then `ray job submit --working-dir . -- python jobs/cache_teacher.py`."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from pipeline import open_cache
from tests.images import good_images
from tests.integration.conftest import TINY, free_port, put_files

pytestmark = pytest.mark.slow  # end to end: left out of the quick loop, `pytest -m "not slow"`

REPO = Path(__file__).resolve().parents[2]
BIN = str(Path(sys.executable).parent)  # the jobs' `python` must be this environment's


@pytest.fixture
def head(tmp_path_factory):
    """A Ray head node with its dashboard and job API, token-authenticated. Yields (dashboard URL,
    environment).

    Its temp dir is its own (RAY_TMPDIR), so the note of "the current cluster" it writes there never
    points another test's Ray at it."""
    logs = tmp_path_factory.mktemp("head")
    ray_tmp = tempfile.mkdtemp(prefix="ray-head-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_TMPDIR=ray_tmp)
    dash = free_port()
    # Every port the head's agents listen on is a free one: the defaults (52365 for the job agent) may be
    # held by another Ray on this machine, e.g. another test's local cluster, and the agent then never comes up.
    agent_ports = [f"--{flag}={free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")]
    proc = subprocess.Popen(
        [f"{BIN}/ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         *agent_ports, "--disable-usage-stats"], env=env, stdout=open(logs / "head.log", "wb"),
        stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:  # the job API answers once the dashboard is up (401 without the token is fine)
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (logs / "head.log").read_text()
                time.sleep(0.5)
        yield address, env
    finally:
        stop(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def stop(proc: subprocess.Popen) -> None:
    """`ray start --block` takes its processes down with it on SIGTERM, but slowly (~30 s): give it a
    few seconds, then kill whatever of the node is left."""
    node = [proc, *psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(node, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=30)


def _submit(address: str, env: dict, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [f"{BIN}/ray", "job", "submit", "--address", address, "--working-dir", ".", "--",
         "python", "jobs/cache_teacher.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


def _submit_when_ready(address: str, env: dict, args: list[str]) -> str:
    """One job, retried while the dashboard answers before its job agent is up; its output."""
    deadline = time.monotonic() + 120
    while True:
        proc = _submit(address, env, args)
        log = proc.communicate(timeout=600)[0] + f"\n(exit {proc.returncode})"
        if "No available agent to submit job" not in log or time.monotonic() > deadline:
            return log
        time.sleep(1)


def _summary(log: str) -> dict:
    """The job's printed summary (the last JSON object of its output)."""
    start = log.rindex("\n{\n") + 1
    return json.loads(log[start:log.index("\n}\n", start) + 2])


def test_ray_job_submit_runs_the_cache_job_on_the_cluster_it_was_submitted_to(head, tmp_path):
    address, env = head
    src, out = str(tmp_path / "images"), str(tmp_path / "cache")
    put_files(src, good_images(4))
    log = _submit_when_ready(address, env, [*TINY, f"source={src}", f"output={out}"])
    assert log.endswith("(exit 0)") and "succeeded" in log, log[-4000:]
    assert "attached to Ray cluster" in log  # it used the submitted-to cluster, not a new one
    cache = open_cache(out)
    assert len(cache) == 4 and _summary(log)["committed_total"] == 4 and cache.verify() == []
