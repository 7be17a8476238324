"""The retry policy: which errors are transient, how an operation is retried, what a final failure says."""
from __future__ import annotations

import http.client

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from pipeline import retry
from pipeline.retry import RetryPolicy, StorageError
from pipeline.storage import Storage

FAST = RetryPolicy(deadline_s=5, initial_s=0.001, max_backoff_s=0.002)


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


def wrapped(cause: BaseException, outer: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize("error, kind", [
    (client_error("SlowDown", 503), "throttled"),
    (client_error("TooManyRequests", 429), "throttled"),
    (client_error("InternalError", 500), "server"),
    (wrapped(client_error("SlowDown", 503), OSError(16, "Please reduce your request rate.")), "throttled"),
    (ConnectionResetError(104, "Connection reset by peer"), "connection"),
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), "connection"),
    (TimeoutError("read timed out"), "timeout"),
    (http.client.IncompleteRead(b"x", 10), "truncated"),
    (OSError("Generic S3 error: error reading a body from connection: end of file before message length reached"),
     "truncated"),
    (Exception("Generic S3 error: Error after 10 retries: HTTP status server error (503 Service Unavailable)"),
     "server"),
])
def test_transient_errors_are_classified(error, kind):
    assert retry.classify(error) == kind


@pytest.mark.parametrize("error", [
    client_error("AccessDenied", 403), client_error("NoSuchKey", 404), client_error("NoSuchBucket", 404),
    client_error("InvalidAccessKeyId", 403),
    wrapped(client_error("AccessDenied", 403), PermissionError("Access Denied")),
    FileNotFoundError("s3://b/k"), PermissionError("denied"), ValueError("bad argument"), KeyError("x"),
    OSError("Generic S3 error: Client error with status 403 Forbidden: connection reset"),
])
def test_permanent_errors_are_not_retried(error):
    assert retry.classify(error) is None
    calls = []

    def fail():
        calls.append(1)
        raise error

    with pytest.raises(type(error) if not isinstance(error, OSError) else OSError) as raised:
        retry.call(FAST, "read", "s3://bucket/key", fail)
    assert len(calls) == 1
    if isinstance(error, OSError):
        assert "s3://bucket/key" in str(raised.value)  # the URL is named


def test_a_transient_error_is_retried_and_counted():
    retry.take_counts()
    outcomes = [client_error("SlowDown", 503), ConnectionResetError(), "ok"]

    def flaky():
        out = outcomes.pop(0)
        if isinstance(out, BaseException):
            raise out
        return out

    assert retry.call(FAST, "read", "s3://b/k", flaky) == "ok"
    assert retry.take_counts() == {"read/connection": 1, "read/throttled": 1}
    assert retry.counts() == {}


def test_a_deadline_ends_the_retries_with_the_url_and_attempts_named():
    calls = []

    def down():
        calls.append(1)
        raise client_error("ServiceUnavailable", 503)

    with pytest.raises(StorageError) as raised:
        retry.call(RetryPolicy(deadline_s=0.05, initial_s=0.001, max_backoff_s=0.01), "write", "s3://b/k", down)
    assert raised.value.transient and raised.value.url == "s3://b/k" and raised.value.operation == "write"
    assert f"after {len(calls)} attempts" in str(raised.value) and len(calls) > 2
    with pytest.raises(StorageError, match="after 3 attempts"):
        retry.call(RetryPolicy(initial_s=0.001, max_backoff_s=0.001, attempts=3), "write", "s3://b/k", down)


def test_the_policy_comes_from_storage_options_and_never_reaches_fsspec():
    store = Storage({"retry": {"deadline_s": 60, "attempts": 4}, "endpoint_url": "http://127.0.0.1:1", "key": "k"})
    assert store.policy == RetryPolicy(deadline_s=60, attempts=4)
    assert store.options_for("s3://b/k") == {"endpoint_url": "http://127.0.0.1:1", "key": "k"}
    per = Storage({"retry": {"deadline_s": 1}, "s3": {"key": "k"}})
    assert per.per_protocol and per.options_for("s3://b/k") == {"key": "k"}
    assert Storage().policy == RetryPolicy()
    with pytest.raises(ValueError, match="unknown keys.*deadline"):
        Storage({"retry": {"deadline": 5}})
    with pytest.raises(ValueError, match="bad policy"):
        Storage({"retry": {"deadline_s": -1}})


def test_backoff_is_jittered_and_capped():
    policy = RetryPolicy(initial_s=1, max_backoff_s=4)
    waits = [policy.backoff(a) for a in range(1, 12) for _ in range(20)]
    assert max(waits) <= 4 and min(waits) >= 0 and len(set(waits)) > 100
