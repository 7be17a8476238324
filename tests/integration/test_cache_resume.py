"""Kill the cache job with SIGKILL at a random point, re-run it, and check the commit protocol."""
from __future__ import annotations

import pytest

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from jobs import cache_teacher
from pipeline import open_cache, storage
from pipeline.cache import shards
from pipeline.storage import Storage
from tests.images import good_images
from tests.integration.conftest import TINY, put_files

pytestmark = pytest.mark.slow  # end to end: left out of the quick loop, `pytest -m "not slow"`

REPO = Path(__file__).resolve().parents[2]
N = 12


def _commits(out: str) -> int:
    return len(shards.committed_shards(Storage(), out)) if os.path.isdir(os.path.join(out, "manifest")) else 0


def test_sigkill_then_rerun_resumes_exactly_once(ray_cluster, tmp_path):
    src, out = str(tmp_path / "images"), str(tmp_path / "cache")
    put_files(src, good_images(N))
    args = [*TINY, f"source={src}", f"output={out}", "shard_size=1", "teacher.batch_images=1", "shards_per_commit=2"]
    log = open(tmp_path / "first-run.log", "wb")
    proc = subprocess.Popen([sys.executable, "jobs/cache_teacher.py", *args, "num_cpus=2"], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while _commits(out) == 0:  # wait until the run is committing, then kill it at a random moment
        assert proc.poll() is None, (tmp_path / "first-run.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "first run never committed a shard"
        time.sleep(0.1)
    # within half a second: the tiny job can commit its last shards ~1.5 s after its first (seen once in CI)
    time.sleep(random.uniform(0.0, 0.5))
    # The whole job: the driver, its local Ray cluster, and every worker. Ray workers run in process
    # groups of their own, and a worker left alive could still commit after the re-run has started.
    job = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)
    for p in job:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(job, timeout=30)

    before = open_cache(out, require_samples=False)
    committed_before = set(before.keys())
    assert 0 < len(committed_before) < N, "the kill came too late to test a resume"
    kept = {u: Storage().read_bytes(u) for u in before.shard_urls()}

    summary = cache_teacher.main(args)

    after = open_cache(out)
    keys = after.keys()
    assert len(keys) == len(set(keys)) == N  # every expected key, exactly once
    assert summary["already_committed"] == len(committed_before)
    assert summary["computed"] == N - len(committed_before)  # committed work was not recomputed
    for url, data in kept.items():
        assert Storage().read_bytes(url) == data
    committed = {f"{name}.tar" for name in shards.committed_shards(Storage(), out)}
    assert committed <= {p.name for p in Path(out, "shards").iterdir()}  # every commit has its tar
    assert after.verify() == []
    # What the killed run left uncommitted (tars, temp files) is an orphan, but the killed run's lease
    # was never removed: no clean-up can tell it from a live writer until its lease expires.
    leases = list(Path(out, "writers").glob("*.json"))
    assert len(leases) == 1  # the killed run's; the rerun removed its own at its end
    shards.clean_orphans(Storage(), out, retention_s=0)
    assert committed <= {p.name for p in Path(out, "shards").iterdir()}
    expired = time.time() - shards.LEASE_TTL_S - 1  # no heartbeat since: as if the ttl had passed
    os.utime(leases[0], (expired, expired))
    shards.clean_orphans(Storage(), out, retention_s=0)
    assert {p.name for p in Path(out, "shards").iterdir()} == committed and open_cache(out).verify() == []
    assert not any(Path(out, "writers").glob("*.json"))  # the expired lease went with its orphans
