"""`ray start --head` on 127.0.0.1, then `ray job submit --working-dir . -- python jobs/cache_teacher.py`."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline import open_cache
from tests.images import good_images
from tests.integration.conftest import free_port, put_files

REPO = Path(__file__).resolve().parents[2]


def test_ray_job_submit_runs_the_cache_job(tmp_path):
    src, out = str(tmp_path / "images"), str(tmp_path / "cache")
    put_files(src, good_images(4))
    bin_dir = str(Path(sys.executable).parent)  # the job's `python` must be this environment's
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    gcs, dash = free_port(), free_port()
    # Every port the head's agents listen on is a free one: the defaults (52365 for the job agent) may be
    # held by another Ray on this machine, e.g. another test's local cluster, and the agent then never comes up.
    agent_ports = [f"--{flag}={free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")]
    head = subprocess.Popen(
        [f"{bin_dir}/ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         *agent_ports, "--disable-usage-stats"], env=env, stdout=open(tmp_path / "head.log", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # the job API answers once the dashboard is up (401 without the token is fine)
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()
                time.sleep(1)
        deadline = time.monotonic() + 120
        while True:  # the dashboard answers before its job agent is ready: retry on that, for a while
            submit = subprocess.run(
                [f"{bin_dir}/ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", ".",
                 "--", "python", "jobs/cache_teacher.py", "backbone=maskclip-test", "augment.scale=[224,160]",
                 "augment.min_side=64", f"source={src}", f"output={out}"],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            log = submit.stdout + submit.stderr
            if "No available agent to submit job" not in log or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert submit.returncode == 0 and "succeeded" in log, log[-4000:]
        assert "attached to Ray cluster" in log  # it used the submitted-to cluster, not a new one
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` takes its processes down with it
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
    cache = open_cache(out)
    assert len(cache) == 4 and cache.verify() == []
