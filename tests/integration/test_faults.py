"""A fault storm: the cache job and a training run with every request to S3 going through a proxy
that fails 10% of them (503 SlowDown, 500, 429, resets, half a GET body, a PUT/POST applied and
left unanswered). Credentials and endpoint only in ``storage_options``, as users give them."""
from __future__ import annotations

import json
import time

import pytest
from safetensors.numpy import load as load_safetensors

from jobs import cache_teacher, train_student
from pipeline import open_cache, storage
from pipeline.bench.s3proxy import CountingProxy, FaultyProxy
from pipeline.cache.sources import make_key
from pipeline.storage import Storage
from tests.images import good_images
from tests.integration.conftest import TINY, make_bucket, put_files

pytestmark = pytest.mark.slow  # end to end: left out of the quick loop, `pytest -m "not slow"`

FAULTS = 0.1
RETRY = ["storage_options.retry.initial_s=0.05", "storage_options.retry.max_backoff_s=1"]
TRAIN = ["epochs=2", "scaling.num_workers=1", "data.loader_workers=1", "log_every=1", "zero_stage=0"]


def options(endpoint: str) -> list[str]:
    return [f"storage_options.endpoint_url={endpoint}", "storage_options.key=testing",
            "storage_options.secret=testing", *RETRY]


def source_tar(images: dict[str, bytes]) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in images.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def storm(ray_cluster, s3_endpoint):
    """A bucket with a source tar of 6 images and a cache made from it through a 10% fault storm."""
    base = f"s3://{make_bucket(s3_endpoint)}"
    images = good_images(6, seed=5)
    put_files(f"{base}/src", {"part_0.tar": source_tar(images)})
    with FaultyProxy(s3_endpoint, faults=0.0, seed=11) as proxy:
        proxy.set_faults(FAULTS)
        summary = cache_teacher.main([*TINY, "shard_size=2", f"source={base}/src/", f"output={base}/cache",
                                      *options(proxy.endpoint)])
        proxy.set_faults(0.0)
        faults = proxy.faults()
        yield {"base": base, "images": images, "summary": summary, "faults": faults, "proxy": proxy}


def test_the_cache_job_exits_0_with_every_key_once_through_a_fault_storm(storm):
    summary, faults = storm["summary"], storm["faults"]
    assert sum(faults.values()) >= 10 and len(faults) >= 4, faults  # the storm happened, of many kinds
    assert (summary["computed"], summary["failed"], summary["keys_committed_twice"]) == (6, 0, 0), summary
    cache = open_cache(f"{storm['base']}/cache")
    tar = f"{storm['base']}/src/part_0.tar"
    assert sorted(cache.keys()) == sorted(f"{make_key(f'{tar}#{n}')}_v0" for n in storm["images"])
    assert cache.verify() == []
    assert summary["storage_retries"] == sum(summary["storage_retries_by_kind"].values())
    recorded = json.loads(Storage().read_text(storage.join(storm["base"], "cache", "runs", summary["run"],
                                                           "summary.json")))
    assert recorded["storage_retries_by_kind"] == summary["storage_retries_by_kind"]


def test_training_through_a_fault_storm_ends_with_the_same_weights(storm, s3_endpoint):
    """The data order is deterministic, and every read is retried in place: bit for bit on CPU."""
    base, proxy = storm["base"], storm["proxy"]
    clean = train_student.main([f"cache={base}/cache", f"output={base}/clean", *TRAIN, *options(s3_endpoint)])
    proxy.set_faults(FAULTS, seed=12)
    try:
        faulty = train_student.main([f"cache={base}/cache", f"output={base}/faulty", *TRAIN, *options(proxy.endpoint)])
    finally:
        proxy.set_faults(0.0)
    assert sum(proxy.faults().values()) > sum(storm["faults"].values())
    store = Storage()
    weights = [load_safetensors(store.read_bytes(f"{base}/{run}/spar-student/student.safetensors"))
               for run in ("clean", "faulty")]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert (weights[0][name] == weights[1][name]).all(), name
    assert clean["loss"] == faulty["loss"]


def test_wrong_credentials_fail_the_cache_job_at_once_naming_the_url(ray_cluster, s3_endpoint, tmp_path):
    """403 is permanent: no retry for 5 minutes, the URL in the error."""
    base = f"s3://{make_bucket(s3_endpoint)}"
    put_files(f"{base}/src", good_images(2, seed=3))
    with CountingProxy(s3_endpoint, admit="AKIARIGHTKEY0000") as gate:
        t0 = time.monotonic()
        with pytest.raises(PermissionError, match=f"{base}/cache"):
            cache_teacher.main([*TINY, f"source={base}/src/", f"output={base}/cache",
                                f"storage_options.endpoint_url={gate.endpoint}", "storage_options.key=AKIAWRONG",
                                "storage_options.secret=x"])
        assert time.monotonic() - t0 < 30
