"""One retry policy for every storage operation: what is transient, how long to keep trying, and a
count of every retry by operation and kind.

Object stores fail all the time in small ways: ``503 SlowDown`` on a hot prefix, ``500
InternalError``, ``429``, connection resets, a body cut mid-stream, a PUT applied whose answer never
came. A job of days makes millions of requests, so each happens many times per run; the clients'
own retries (botocore's, s3fs's, delta-rs's) carry most of them, and this layer carries the rest: an
operation is retried with exponential backoff and full jitter until it succeeds, fails for a
permanent reason, or its deadline passes (default 5 minutes an operation). Permanent errors (403,
404, a missing bucket, bad credentials, bad arguments) are never retried: they fail at once with
the URL named.

The policy is configured once, with the job's storage options (``storage_options.retry``; see
`RetryPolicy`), travels with the `pipeline.storage.Storage` to every process that does I/O, and
is what every storage operation of the project runs under.

Retries are counted per process (`counts`, `take_counts`) and logged as warnings naming the
operation, the URL and the error, so a job can report them in its summary and metrics.

``SPAR_STORAGE_RETRY=off`` in the environment bypasses this layer (plain client calls, no resumed
reads, no size checks): only for measuring what it costs (``benchmark.py faults``).
"""
from __future__ import annotations

import asyncio
import collections
import errno
import http.client
import logging
import os
import random
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, fields
from typing import Any, Callable, TypeVar

from spar.weights import public_url

log = logging.getLogger(__name__)
T = TypeVar("T")

# S3 error codes (and the HTTP statuses S3-compatible stores answer with) that mean "try again".
_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "Throttling", "ThrottlingException",
                    "TooManyRequests", "RequestTimeout", "RequestLimitExceeded", "BandwidthLimitExceeded",
                    "OperationAborted", "RequestTimeTooSkewed", "ExpiredToken", "IncompleteBody",
                    "500", "502", "503", "504", "429"}
_THROTTLED_CODES = {"SlowDown", "Throttling", "ThrottlingException", "TooManyRequests", "429",
                    "RequestLimitExceeded", "BandwidthLimitExceeded"}
# Error texts of clients that report everything as one error class (delta-rs / object_store,
# pyarrow) or wrap the real cause away: a transient cause, named in the text.
_TRANSIENT_TEXT = re.compile(
    r"SlowDown|InternalError|ServiceUnavailable|TooManyRequests|Throttl|RequestTimeout|"
    r"\b(?:500|502|503|504|429)\b|Internal Server Error|Service Unavailable|Too Many Requests|"
    r"connection (?:reset|refused|closed|aborted)|reset by peer|broken pipe|timed? ?out|"
    r"error sending request|error reading a body|end of file before message length|"
    r"incomplete ?read|IncompleteRead|ResponseStreamingError|ServerDisconnected|"
    r"Server disconnected|payload is not completed|response ended prematurely|"
    r"Connection was closed|Could not connect|Remote end closed",
    re.IGNORECASE)
# ... unless the same text also names a permanent cause.
_PERMANENT_TEXT = re.compile(
    r"\b(?:403|404)\b|AccessDenied|Forbidden|InvalidAccessKeyId|SignatureDoesNotMatch|NoSuchBucket|"
    r"NoSuchKey|not found", re.IGNORECASE)


def _client_error_code(exc: BaseException) -> str | None:
    """The S3 error code (or HTTP status) of a botocore ClientError, else None."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = (response.get("Error") or {}).get("Code")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return str(code or status or "") or None


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and its causes, outermost first."""
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        out.append(exc)
        seen.add(id(exc))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return out


def code_kind(code: str) -> str | None:
    """The transient kind of an S3 error code or HTTP status (``throttled``, ``server``), or None."""
    if code in _THROTTLED_CODES:
        return "throttled"
    return "server" if code in _TRANSIENT_CODES else None


def classify(exc: BaseException) -> str | None:
    """The transient kind of a storage error (``throttled``, ``server``, ``connection``, ``timeout``,
    ``truncated``), or None for a permanent one (not found, denied, bad request, bad data, a bug)."""
    if isinstance(exc, StorageError):
        return None  # it already gave up under the policy: an enclosing call does not start over
    chain = _chain(exc)
    for e in chain:  # an explicit answer from the store decides first
        code = _client_error_code(e)
        if code is not None:
            return code_kind(code)
    for e in chain:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                          FileExistsError)):
            return None
        if isinstance(e, (ConnectionError, socket.gaierror)):
            return "connection"
        if isinstance(e, (TimeoutError, socket.timeout, asyncio.TimeoutError)):
            return "timeout"
        if isinstance(e, http.client.IncompleteRead) or type(e).__name__ in (
                "IncompleteReadError", "ResponseStreamingError", "ClientPayloadError", "ContentLengthError"):
            return "truncated"
        if type(e).__name__ in ("EndpointConnectionError", "ConnectionClosedError", "ServerDisconnectedError",
                                "ClientConnectionError", "ClientOSError", "ProxyConnectionError",
                                "RemoteDisconnected", "ProtocolError", "HTTPClientError"):
            return "connection"
        if type(e).__name__ in ("ReadTimeoutError", "ConnectTimeoutError", "FSTimeoutError", "ServerTimeoutError"):
            return "timeout"
        if isinstance(e, OSError) and e.errno in (errno.EBUSY, errno.EREMOTEIO, errno.ECONNRESET,
                                                  errno.ETIMEDOUT, errno.EAGAIN):
            return "server"  # s3fs's translation of SlowDown / InternalError / 503 when the cause is gone
    text = " ".join(f"{type(e).__name__}: {e}" for e in chain)
    if _TRANSIENT_TEXT.search(text) and not _PERMANENT_TEXT.search(text):
        return "truncated" if re.search(r"body|end of file|incomplete|prematurely|payload", text, re.I) else (
            "throttled" if re.search(r"SlowDown|Throttl|TooMany|429", text, re.I) else "server")
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """How a storage operation is retried (``storage_options: {retry: {...}}`` sets these):
    exponential backoff with full jitter, from `initial_s` doubling up to `max_backoff_s`, until
    the operation succeeds, fails permanently, or `deadline_s` has passed since its first try
    (then the last error is raised, naming the URL and the attempts). `attempts` caps the tries
    (0: no cap but the deadline)."""

    deadline_s: float = 300.0  # per operation: long enough for an S3 prefix to scale out of SlowDown
    initial_s: float = 0.1
    max_backoff_s: float = 15.0
    attempts: int = 0

    def __post_init__(self):
        if self.deadline_s < 0 or self.initial_s <= 0 or self.max_backoff_s < self.initial_s or self.attempts < 0:
            raise ValueError(f"retry: bad policy {self}")

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> "RetryPolicy":
        """The policy of a ``retry`` mapping (unknown keys are errors)."""
        options = dict(options or {})
        unknown = set(options) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"storage_options.retry: unknown keys {sorted(unknown)} "
                             f"(known: {[f.name for f in fields(cls)]})")
        return cls(**{k: float(v) if k != "attempts" else int(v) for k, v in options.items()})

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1-based): full jitter over the exponential."""
        return random.uniform(0, min(self.max_backoff_s, self.initial_s * 2 ** (attempt - 1)))


_lock = threading.Lock()
_counts: collections.Counter = collections.Counter()  # (operation, kind) -> retries, this process


def record(operation: str, kind: str, n: int = 1) -> None:
    """Count `n` retries of `operation` for a `kind` of transient error."""
    with _lock:
        _counts[(operation, kind)] += n


def counts() -> dict[str, int]:
    """This process's retries so far, as ``{"operation/kind": n}``."""
    with _lock:
        return {f"{op}/{kind}": n for (op, kind), n in sorted(_counts.items())}


def take_counts() -> dict[str, int]:
    """`counts`, then zero them: what a task reports once (a worker process runs many tasks)."""
    with _lock:
        out = {f"{op}/{kind}": n for (op, kind), n in sorted(_counts.items())}
        _counts.clear()
        return out


def merge(total: dict[str, int], more: dict[str, int] | None) -> dict[str, int]:
    """Add the counts `more` into `total` (in place); returns `total`."""
    for k, n in (more or {}).items():
        total[k] = total.get(k, 0) + int(n)
    return total


GAVE_UP = "still failing after"  # in the message of a transient error past its deadline (Ray Data matches it)


class StorageError(OSError):
    """A storage operation that failed for good: permanently, or transiently past its deadline
    (`transient` tells which). Its message names the operation, the URL and the attempts."""

    def __init__(self, message: str, *, url: str, operation: str, transient: bool):
        super().__init__(errno.EIO if transient else errno.EPERM, message)
        self.url, self.operation, self.transient = url, operation, transient

    def __str__(self) -> str:
        return self.strerror


def enabled() -> bool:
    """False when ``SPAR_STORAGE_RETRY=off`` (see the module docstring)."""
    return os.environ.get("SPAR_STORAGE_RETRY", "on") != "off"


def call(policy: RetryPolicy, operation: str, url: str, fn: Callable[[], T],
         on_retry: Callable[[BaseException], None] | None = None) -> T:
    """``fn()`` under `policy`: transient errors are retried (each counted and logged, `on_retry`
    called before the next try), permanent ones raised at once. The error that ends it is raised
    with the URL named: as it was for a permanent one whose text already names the URL, else as a
    `StorageError` from it."""
    if not enabled():
        return fn()
    start, attempt = time.monotonic(), 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below; permanent errors re-raised
            kind = classify(e)
            elapsed = time.monotonic() - start
            wait = policy.backoff(attempt) if kind else 0.0
            out_of_tries = policy.attempts and attempt >= policy.attempts
            if kind is None or out_of_tries or elapsed + wait > policy.deadline_s:
                final = _final(e, kind, operation, url, attempt, elapsed)
                if final is e:
                    raise
                raise final from e
            record(operation, kind)
            log.warning("storage %s of %s: %s error (%s: %s); retry %d in %.1f s", operation, public_url(url), kind,
                        type(e).__name__, _short(e, url), attempt, wait)
            if on_retry is not None:
                on_retry(e)
            time.sleep(wait)


def _short(e: BaseException, url: str, limit: int = 300) -> str:
    """The error's text on one line, cut at `limit`, without `url`'s credentials (a signed URL's
    query string, a password in its user info), which an HTTP error quotes."""
    text = " ".join(str(e).split())
    parsed = urllib.parse.urlparse(url)
    user = parsed.netloc.rpartition("@")[0]
    for secret in (parsed.query, user if ":" in user else ""):
        if secret:
            text = text.replace(secret, "<redacted>")
    return text if len(text) <= limit else text[:limit] + " ..."


def _final(e: BaseException, kind: str | None, operation: str, url: str, attempts: int, elapsed: float) -> BaseException:
    if isinstance(e, StorageError):
        return e
    shown = public_url(url)  # a signed URL's query string is its credential: never in a message
    if kind is None:  # permanent: the same error, with the URL named if it was not
        if not isinstance(e, OSError) or url in str(e) or shown in str(e):
            return e
        if type(e) in (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError):
            return type(e)(f"{operation} {shown}: {_short(e, url)}")
        return StorageError(f"{operation} {shown} failed: {type(e).__name__}: {_short(e, url)}", url=shown,
                            operation=operation, transient=False)
    return StorageError(f"{operation} {shown} {GAVE_UP} {attempts} attempts in {elapsed:.0f} s "
                        f"(transient {kind} errors; the last: {type(e).__name__}: {_short(e, url)})",
                        url=shown, operation=operation, transient=True)
