"""Storage faults past the retry layer: wrong credentials end the job at once, naming the URL; a shard
upload that outlasts every storage retry fails its writer task, which Ray Data runs again. (The fault storms: `test_cache_job.py`'s SA-1B test runs the cache job, and `test_train.py`
a training run, through a proxy failing 10% of the S3 requests; `tests/unit/test_storage_faults.py`
each storage operation.)"""
from __future__ import annotations

import time

import pytest

from jobs import cache_teacher
from pipeline import open_cache
from pipeline.bench.s3proxy import CountingProxy, FaultyProxy
from tests.images import good_images
from tests.integration.conftest import TINY, make_bucket, put_files

pytestmark = pytest.mark.slow  # end to end: left out of the quick loop, `pytest -m "not slow"`


def test_wrong_credentials_fail_the_cache_job_at_once_naming_the_url(ray_cluster, s3_endpoint):
    """403 is permanent: no retry for the deadline's 5 minutes, the URL in the error."""
    base = f"s3://{make_bucket(s3_endpoint)}"
    put_files(f"{base}/src", good_images(2, seed=3))
    with CountingProxy(s3_endpoint, admit="AKIARIGHTKEY0000") as gate:
        t0 = time.monotonic()
        with pytest.raises(PermissionError, match=f"{base}/cache"):
            cache_teacher.main([*TINY, f"source={base}/src/", f"output={base}/cache",
                                f"storage_options.endpoint_url={gate.endpoint}", "storage_options.key=AKIAWRONG",
                                "storage_options.secret=x"])
        assert time.monotonic() - t0 < 30


def test_a_shard_upload_failing_past_every_storage_retry_fails_its_task_and_ray_data_runs_it_again(
        ray_cluster, s3_endpoint):
    """Here the storage layer gives up at the first error (``retry.attempts=1``, botocore's retries
    off): the first two shard uploads answer 500 InternalError, so their writer tasks fail. Ray Data
    runs each again with the same bytes (`max_map_retries`), and the job ends with every key once,
    nothing failed, every shard whole."""
    base = f"s3://{make_bucket(s3_endpoint)}"
    put_files(f"{base}/src", good_images(6, seed=4))
    with FaultyProxy(s3_endpoint) as proxy:
        proxy.set_faults(1.0, ["500"], methods=["PUT"], path="/cache/shards/", limit=2)
        summary = cache_teacher.main([
            *TINY, f"source={base}/src/", f"output={base}/cache", "shard_size=2",
            f"storage_options.endpoint_url={proxy.endpoint}", "storage_options.key=testing",
            "storage_options.secret=testing", "storage_options.retry.attempts=1",
            "storage_options.config_kwargs.retries.total_max_attempts=1"])
        faults = proxy.faults()
    assert faults == {"500": 2}  # both reached a writer task: nothing below it retried them
    assert (summary["computed"], summary["failed"], summary["keys_committed_twice"]) == (6, 0, 0)
    assert summary["shards_written"] == 3 and summary["committed_total"] == 6
    cache = open_cache(f"{base}/cache")
    assert len(cache) == len(set(cache.keys())) == 6 and cache.verify() == []
