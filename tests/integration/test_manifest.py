"""The manifest as a Delta Lake table, on local disk and on the S3 server: concurrent writers, a
clean-up beside a live job, and the cost of opening. (Training runs pinned to one version while their
caches grow: test_safe_runs.py, in the ZeRO-3 resume.)"""
from __future__ import annotations

import pytest

import json
import subprocess
import sys
import time
from pathlib import Path

from pipeline import open_cache, storage
from pipeline.bench.s3proxy import CountingProxy
from pipeline.cache import shards
from pipeline.cache.reader import FORMAT
from pipeline.storage import Storage
from tests.images import good_images
from tests.integration.conftest import TINY, make_bucket, put_files
from tests.unit.test_encode_shards import _rows, _sample

pytestmark = pytest.mark.slow  # end to end: left out of the quick loop, `pytest -m "not slow"`

REPO = Path(__file__).resolve().parents[2]


def _tars(out: str) -> set[str]:
    return {u.rsplit("/", 1)[1] for u in Storage().list_files(storage.join(out, "shards"))}


def _consistent(out: str, n: int):
    """Every key once, every committed row's tar there and intact."""
    cache = open_cache(out)
    assert sorted(cache.keys()) == sorted(set(cache.keys())) and len(cache) == n
    assert {t.rsplit("/", 1)[1] for t in cache.shards.column("tar").to_pylist()} <= _tars(out)
    assert cache.verify() == []
    assert sum(1 for _ in cache) == n
    return cache


def test_two_cache_jobs_at_once_beside_a_cleanup_loop_lose_nothing(ray_cluster, storage_root, tmp_path):
    """Two drivers (as two users' commands) on one cluster write one output at once, one shard per
    sample, while a clean-up runs in a loop beside them: both commit, nothing is lost, every key is
    read once, a key both computed is reported, and the clean-up, with no retention at all, removes
    only the orphan a dead writer left, never a live job's uncommitted tar (the jobs' leases keep
    those, however long a tar waits for its commit on a slow machine)."""
    import ray

    src, out = storage.join(storage_root, "src"), storage.join(storage_root, "cache")
    n = 6
    put_files(src, good_images(n))
    orphan = shards.shard_url(out, "0" * 32)  # left by a writer that died before its commit
    shards._write_tar(Storage(), orphan, [_sample("dead", seed=99)[0]])
    args = [sys.executable, "jobs/cache_teacher.py", *TINY, f"source={src}", f"output={out}", "shard_size=1",
            "teacher.batch_images=1", "commit_every_s=2",
            f"ray_address={ray.get_runtime_context().gcs_address}"]  # the session's cluster
    logs = [open(tmp_path / f"job{i}.log", "wb") for i in range(2)]
    procs = [subprocess.Popen(args, cwd=REPO, stdout=f, stderr=subprocess.STDOUT) for f in logs]
    removed, deadline = [], time.monotonic() + 600
    while any(p.poll() is None for p in procs) or (Storage().exists(orphan) and time.monotonic() < deadline):
        if Storage().exists(storage.join(out, "manifest")):
            removed += shards.clean_orphans(Storage(), out, retention_s=0)
        assert time.monotonic() < deadline, "the jobs did not end within 600 s"
        time.sleep(0.2)
    codes = [p.wait() for p in procs]
    texts = [(tmp_path / f"job{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], texts[0][-2000:] + texts[1][-2000:]
    assert all("attached to Ray cluster" in t for t in texts)
    summaries = [json.loads(t[t.rindex("\n{\n") + 1:]) for t in texts]
    assert removed == [orphan]  # only the dead writer's orphan
    assert Storage().list_files(storage.join(out, "writers")) == []  # each job removed its lease
    cache = _consistent(out, n)
    assert _tars(out) == {t.rsplit("/", 1)[1] for t in cache.shards.column("tar").to_pylist()}
    twice = set(cache.duplicates.column("key").to_pylist())
    # both jobs computed what they saw uncommitted; a key both committed is reported, and read once
    assert sum(s["computed"] for s in summaries) == n + len(twice)
    assert max(s["keys_committed_twice"] for s in summaries) <= len(twice)


def test_opening_a_finished_cache_costs_a_constant_number_of_requests(s3_endpoint):
    bucket = make_bucket(s3_endpoint)
    with CountingProxy(s3_endpoint) as proxy:
        store = Storage({"endpoint_url": proxy.endpoint, "key": "testing", "secret": "testing"})
        cost = {}
        for n in (5, 20):  # both over finish()'s compaction threshold of 4 small files
            out = f"s3://{bucket}/cache-{n}"
            shards.write_json(store, storage.join(out, "teacher.json"), {"format": FORMAT})
            shards.create_tables(store, out)
            for i in range(n):
                batch = [_sample(f"k{i}", seed=i)[0]]
                shards.commit_shard(store, out, batch, _rows(batch), run="r")
            shards.finish(store, out)  # what every cache job does at its end
            proxy.reset()
            assert len(open_cache(out, store)) == n
            cost[n] = proxy.requests()
    assert abs(cost[20] - cost[5]) <= 3, cost  # 4x the commits, the same requests
