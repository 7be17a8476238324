"""Storage faults the retry layer must not retry: wrong credentials end the job at once, naming the
URL. (The fault storms: `test_cache_job.py`'s SA-1B test runs the cache job, and `test_train.py`
a training run, through a proxy failing 10% of the S3 requests; `tests/unit/test_storage_faults.py`
each storage operation.)"""
from __future__ import annotations

import time

import pytest

from jobs import cache_teacher
from pipeline.bench.s3proxy import CountingProxy
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
