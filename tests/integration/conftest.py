"""Real components on loopback: a moto S3 server, a local Ray cluster, storage roots on both."""
from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.storage import Storage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-protocol server (moto) on 127.0.0.1, in a process of its own, for the session;
    credentials are fakes in the environment."""
    from pipeline.bench.s3proxy import start_moto

    endpoint, proc = start_moto()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=30)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def make_bucket(endpoint: str) -> str:
    import boto3

    name = f"spar-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


def forget_dead_ray_address() -> None:
    """Remove Ray's note of "the current cluster" (``/tmp/ray/ray_current_cluster``) when that cluster
    is gone. ``ray start`` and ``ray.cluster_utils.Cluster`` write it; a cluster killed mid-test
    leaves it behind, and Ray Train's placement-group cleaner then asks a dead GCS about its
    controller: every training run ends 12 s late ("Failed to stop PlacementGroupCleaner")."""
    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(None)
    try:
        host, port = Path(path).read_text().strip().rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=2):
            return  # alive
    except (OSError, ValueError):
        pass
    Path(path).unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _no_dead_ray_address():
    forget_dead_ray_address()
    yield
    forget_dead_ray_address()


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One local Ray cluster for the session (started after the S3 env, so workers inherit it)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def storage_root(request, tmp_path, s3_endpoint):
    """A fresh root URL on the local disk and on the S3 server (every storage test runs on both)."""
    if request.param == "local":
        return str(tmp_path / "store")
    return f"s3://{make_bucket(s3_endpoint)}/root"


def put_files(root: str, files: dict[str, bytes]) -> None:
    from pipeline import storage

    for name, data in files.items():
        Storage().write_bytes(storage.join(root, name), data)


# -- caches built once per session, read by many tests ---------------------------------------------
# Read-only: a test that writes into a cache makes its own (or copies one with `copy_tree`). A test
# that checks a refused job left a cache untouched may point that job at a shared one.

TINY = ["backbone=maskclip-test", "augment.scale=[224,160]", "augment.min_side=64", "shard_size=3",
        "teacher.batch_images=2"]  # the tiny teacher at small sizes: a cache job in seconds


@dataclass(frozen=True)
class SharedCache:
    """A cache made by ``cache_teacher.main([*TINY, *args, source=, output=])`` from `files`."""

    url: str
    source: str
    files: dict  # source file name -> bytes
    args: tuple  # the job's arguments besides TINY, source and output

    def argv(self, *extra: str, output: str | None = None) -> list[str]:
        """The job's command line again (e.g. to rerun it, or to refuse a change), into `output`."""
        return [*TINY, *self.args, f"source={self.source}", f"output={output or self.url}", *extra]


def _shared_cache(source: str, output: str, files: dict, *args: str) -> SharedCache:
    from jobs import cache_teacher

    put_files(source, files)
    cache = SharedCache(output, source, files, args)
    summary = cache_teacher.main(cache.argv())
    views = int(next((a.split("=")[1] for a in args if a.startswith("views=")), 1))
    assert (summary["computed"], summary["failed"]) == (len(files) * views, 0), summary
    return cache


@pytest.fixture(scope="session")
def local_cache(ray_cluster, tmp_path_factory) -> SharedCache:
    """5 images, one view each, on the local disk: an odd number of samples, so 2 ranks pad a step."""
    from tests.images import good_images

    root = tmp_path_factory.mktemp("local-cache")
    return _shared_cache(str(root / "images"), str(root / "cache"), good_images(5, seed=11))


@pytest.fixture(scope="session")
def s3_cache(ray_cluster, s3_endpoint) -> SharedCache:
    """6 images x 2 views on the S3 server."""
    from tests.images import good_images

    root = f"s3://{make_bucket(s3_endpoint)}"
    return _shared_cache(f"{root}/images", f"{root}/cache", good_images(6, seed=0), "views=2")


@pytest.fixture(params=["local_cache", pytest.param("s3_cache", marks=pytest.mark.slow)])
def shared_cache(request) -> SharedCache:
    """Each shared cache in turn (a test of what every storage must do)."""
    return request.getfixturevalue(request.param)


def snapshot(root: str) -> dict[str, bytes]:
    """Every object under `root` and its bytes (to show that nothing changed)."""
    store = Storage()
    return {u: store.read_bytes(u) for u in store.list_files(root)}
