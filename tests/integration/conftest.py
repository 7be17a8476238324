"""Real components on loopback: a moto S3 server, a local Ray cluster, storage roots on both."""
from __future__ import annotations

import os
import socket
import uuid

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


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One local Ray cluster for the session (started after the S3 env, so workers inherit it)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(params=["local", "s3"])
def storage_root(request, tmp_path, s3_endpoint):
    """A fresh root URL on the local disk and on the S3 server (every storage test runs on both)."""
    if request.param == "local":
        return str(tmp_path / "store")
    return f"s3://{make_bucket(s3_endpoint)}/root"


def put_files(root: str, files: dict[str, bytes]) -> None:
    from pipeline import storage

    for name, data in files.items():
        Storage().write_bytes(storage.join(root, name), data)
