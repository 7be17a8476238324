"""The fault-injecting S3 proxy: each kind of fault fails a client the way a real store does, a
write left unanswered is applied all the same, faults are counted and reproducible, and at rate 0
the proxy is transparent. Clients here never retry, so each fault shows."""
from __future__ import annotations

import os
import urllib.error
import uuid

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import (ClientError, ConnectionClosedError, EndpointConnectionError,
                                 IncompleteReadError, ResponseStreamingError)

from pipeline.bench.s3proxy import FAULT_KINDS, FaultyProxy

DROPPED = (ConnectionClosedError, EndpointConnectionError)  # what botocore makes of a reset connection


@pytest.fixture(scope="module")
def proxy(moto):
    with FaultyProxy(moto) as p:
        yield p


@pytest.fixture
def s3(proxy):
    """A client of the proxy that never retries; the proxy's faults off and counts zeroed after."""
    yield boto3.client("s3", endpoint_url=proxy.endpoint, aws_access_key_id="testing",
                       aws_secret_access_key="testing", region_name="us-east-1",
                       config=Config(retries={"total_max_attempts": 1, "mode": "standard"}))
    proxy.set_faults(0.0)
    proxy.reset()


@pytest.fixture
def bucket(s3, proxy):
    """A bucket holding ``present`` (64 KiB), created with faults off."""
    name = f"proxy-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=name)
    s3.put_object(Bucket=name, Key="present", Body=os.urandom(1 << 16))
    proxy.reset()
    return name


def exists(s3, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as e:
        assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 404
        return False


@pytest.mark.parametrize("kind, code", [("503", "SlowDown"), ("500", "InternalError"), ("429", "TooManyRequests")])
def test_error_answers_carry_s3_codes_and_write_nothing(s3, proxy, bucket, kind, code):
    proxy.set_faults(1.0, [kind])
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="new", Body=b"x" * 100)
    assert e.value.response["Error"]["Code"] == code
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == int(kind)
    assert proxy.faults() == {kind: 1}
    proxy.set_faults(0.0)
    assert not exists(s3, bucket, "new")


def test_reset_drops_the_connection_and_writes_nothing(s3, proxy, bucket):
    proxy.set_faults(1.0, ["reset"])
    with pytest.raises(DROPPED):
        s3.put_object(Bucket=bucket, Key="new", Body=b"x" * 100)
    assert proxy.faults() == {"reset": 1}
    proxy.set_faults(0.0)
    assert not exists(s3, bucket, "new")


def test_half_body_cuts_a_read_mid_stream(s3, proxy, bucket):
    proxy.set_faults(1.0, ["half_body"])
    resp = s3.get_object(Bucket=bucket, Key="present")  # the headers arrive whole
    assert resp["ContentLength"] == 1 << 16
    with pytest.raises((ResponseStreamingError, IncompleteReadError)):
        resp["Body"].read()
    with pytest.raises(DROPPED):  # no body to cut: reset instead
        s3.head_object(Bucket=bucket, Key="present")
    assert proxy.faults() == {"half_body": 2}


def test_unanswered_write_is_applied_but_fails_the_client(s3, proxy, bucket):
    proxy.set_faults(1.0, ["unanswered"])
    with pytest.raises(DROPPED):
        s3.put_object(Bucket=bucket, Key="new", Body=b"applied")
    assert s3.get_object(Bucket=bucket, Key="present")["Body"].read()  # reads are not drawn for it
    assert proxy.faults() == {"unanswered": 1}
    proxy.set_faults(0.0)
    assert s3.get_object(Bucket=bucket, Key="new")["Body"].read() == b"applied"


def test_faults_are_reproducible_from_the_seed(s3, proxy, bucket):
    def outcomes() -> list[bool]:
        proxy.set_faults(0.5, ["503"], seed=7)
        failed = []
        for _ in range(24):
            try:
                s3.head_object(Bucket=bucket, Key="present")
                failed.append(False)
            except ClientError:
                failed.append(True)
        return failed

    first = outcomes()
    assert 0 < sum(first) < len(first)
    assert outcomes() == first
    assert proxy.faults() == {"503": 2 * sum(first)}
    proxy.reset()
    assert proxy.faults() == {}


def test_rate_zero_is_transparent(s3, proxy, bucket):
    proxy.set_faults(0.0, list(FAULT_KINDS))
    for i in range(10):
        s3.put_object(Bucket=bucket, Key=f"k{i}", Body=bytes([i]) * 1000)
        assert s3.get_object(Bucket=bucket, Key=f"k{i}")["Body"].read() == bytes([i]) * 1000
    assert proxy.faults() == {}
    assert proxy.requests() == 20


def test_bad_fault_settings_are_refused(moto, proxy):
    with pytest.raises(urllib.error.HTTPError) as e:
        proxy.set_faults(0.5, ["404"])
    assert e.value.code == 400
    with pytest.raises(urllib.error.HTTPError):
        proxy.set_faults(1.5)
    with pytest.raises(ValueError):
        FaultyProxy(moto, 0.1, kinds=("404",))


def test_a_targeted_storm_fails_only_its_requests_and_stops_at_its_limit(s3, proxy, bucket):
    """``methods``, ``path`` and ``limit`` aim faults at some requests (a job's shard uploads, say):
    others pass untouched, and after `limit` faults everything passes."""
    proxy.set_faults(1.0, ["500"], methods=["PUT"], path="/shards/", limit=2)
    s3.put_object(Bucket=bucket, Key="other/a", Body=b"a")  # another path: untouched
    s3.head_object(Bucket=bucket, Key="other/a")  # another method: untouched
    outcomes = []
    for i in range(4):
        try:
            s3.put_object(Bucket=bucket, Key=f"shards/{i}.tar", Body=b"t")
            outcomes.append("ok")
        except ClientError as e:
            outcomes.append(e.response["Error"]["Code"])
    assert outcomes == ["InternalError", "InternalError", "ok", "ok"]
    assert proxy.faults() == {"500": 2}
    proxy.set_faults(1.0, ["500"], methods=["PUT"], path="/shards/", limit=1)  # the limit counts from here
    with pytest.raises(ClientError):
        s3.put_object(Bucket=bucket, Key="shards/again.tar", Body=b"t")
    s3.put_object(Bucket=bucket, Key="shards/again.tar", Body=b"t")
    assert proxy.faults() == {"500": 3}
