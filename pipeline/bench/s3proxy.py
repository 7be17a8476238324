"""A local S3 server (moto's, for benchmarks and tests) and a counting HTTP proxy in front of any
S3-compatible server: how many storage requests an operation costs, whatever client makes them
(s3fs, delta-rs), and, given a fault rate, an object store that fails the way real ones do. Both
run as processes of their own (clients that hold the GIL while they wait on the network must not
share a process with the server).

Faults (`FAULT_KINDS`), each request drawn with probability ``faults`` from a seeded generator:
``503`` (SlowDown), ``500`` (InternalError), ``429`` (TooManyRequests), ``reset`` (the connection
reset before any answer; nothing forwarded), ``half_body`` (forwarded; the answer's headers and
half its body, then a reset: a GET cut mid-stream; bodiless answers are reset instead), and
``unanswered`` (a PUT, POST or DELETE forwarded, so the store applies it, then a reset instead of
the answer; a GET or HEAD drawn for it is forwarded unharmed and not counted). ``GET /__faults__``
answers the faults injected per kind; ``POST /__faults__?rate=0.1&kinds=503,reset&seed=3`` sets
the rate (and kinds, seed) from then on; ``&methods=PUT&path=/shards/&limit=2`` aims it at some
requests only (a method, a path substring) and stops it after that many faults.

The proxy's ``GET /__requests__`` answers the number of requests forwarded so far, ``GET /__traffic__``
the requests and response body bytes per path (JSON), and ``POST /__reset__`` zeroes both.
Given ``admit=<access key id>`` it answers 403 to every request not signed with that key (moto itself
accepts any credentials): a test can then tell a client that used the credentials it was given from
one that fell back to others (the environment's, a provider chain's).
Used by ``benchmark.py manifest`` and the manifest tests, against the moto S3 server.
"""
from __future__ import annotations

import http.client
import json
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULT_KINDS = ("503", "500", "429", "reset", "half_body", "unanswered")
_ERRORS = {"503": ("SlowDown", "Please reduce your request rate."),
           "500": ("InternalError", "We encountered an internal error. Please try again."),
           "429": ("TooManyRequests", "Too many requests.")}
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
           b"<Message>Access Denied (not signed with the admitted access key)</Message></Error>")


def signed_by(headers, path: str) -> str | None:
    """The access key id that signed a request (SigV4 header or pre-signed query), or None."""
    auth = headers.get("Authorization") or ""
    if "Credential=" in auth:
        return auth.split("Credential=", 1)[1].split("/", 1)[0]
    query = urllib.parse.parse_qs(urllib.parse.urlparse(path).query)
    cred = (query.get("X-Amz-Credential") or query.get("AWSAccessKeyId") or [""])[0]
    return cred.split("/", 1)[0] or None


def _rate(rate: float | str) -> float:
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"fault rate {rate} is not in [0, 1]")
    return rate


def _kinds(kinds: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    kinds = tuple(kinds.split(",") if isinstance(kinds, str) else kinds)
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown or not kinds:
        raise ValueError(f"fault kinds {kinds} are not a choice of {FAULT_KINDS}")
    return kinds


def _fault_settings(query: dict[str, list[str]], storm: dict) -> dict:
    """The settings a ``POST /__faults__?rate=&kinds=&seed=`` query changes (ValueError if bad)."""
    changed = {"rate": _rate(query.get("rate", [storm["rate"]])[0])}
    if query.get("kinds"):
        changed["kinds"] = _kinds(query["kinds"][0])
    if query.get("seed"):
        changed["rng"] = random.Random(int(query["seed"][0]))
    changed["methods"] = tuple(query["methods"][0].upper().split(",")) if query.get("methods") else None
    changed["path"] = query.get("path", [""])[0]
    changed["limit"] = int(query.get("limit", ["0"])[0])
    if changed["limit"] < 0:
        raise ValueError(f"fault limit {changed['limit']} is negative")
    return changed


def serve(upstream: str, port: int, admit: str | None = None, faults: float = 0.0,
          kinds: tuple[str, ...] | None = None, seed: int = 0) -> None:
    """Forward every request to `upstream`, counting them (blocks); with `admit`, only those signed
    with that access key id (others: 403 AccessDenied); with `faults`, that share of them faulted
    (`FAULT_KINDS`, or only `kinds`), drawn from ``random.Random(seed)``."""
    target = urllib.parse.urlparse(upstream)
    lock, count, traffic = threading.Lock(), [0], {}  # traffic: path -> [requests, response body bytes]
    storm = {"rate": _rate(faults), "kinds": _kinds(kinds or FAULT_KINDS), "rng": random.Random(seed), "seen": {},
             "methods": None, "path": "", "limit": 0, "since": 0}

    def draw(method: str, path: str) -> str | None:
        with lock:
            if storm["methods"] and method not in storm["methods"] or storm["path"] not in path:
                return None  # a targeted storm: other requests pass untouched, drawing nothing
            if storm["limit"] and sum(storm["seen"].values()) - storm["since"] >= storm["limit"]:
                return None
            if not storm["rate"] or storm["rng"].random() >= storm["rate"]:
                return None
            kind = storm["rng"].choice(storm["kinds"])
            if kind == "unanswered" and method not in ("PUT", "POST", "DELETE"):
                return None
            storm["seen"][kind] = storm["seen"].get(kind, 0) + 1
            return kind

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # A reply is two writes (headers, then body): with Nagle's algorithm the body waits for the
        # client's delayed ACK of the headers, ~40 ms per request on Linux (51 ms a GET instead of 8).
        disable_nagle_algorithm = True

        def log_message(self, *args) -> None:  # quiet
            pass

        def _reply(self, status: int, body: bytes, headers: list[tuple[str, str]] = ()) -> None:
            self.send_response(status)
            length = str(len(body))
            for k, v in headers:
                if k.lower() == "content-length":
                    length = v if self.command == "HEAD" else length  # HEAD: the size of what GET would send
                elif k.lower() not in _HOP:
                    self.send_header(k, v)
            self.send_header("Content-Length", length)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _reset(self) -> None:
            """Drop the connection with a TCP reset, answering nothing more."""
            self.close_connection = True
            try:
                self.wfile.flush()
            except OSError:
                pass
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

        def _control(self) -> bool:
            """Answer a control request (``/__requests__``, ``/__traffic__``, ``/__faults__``,
            ``/__reset__``); False for any other, which is the store's."""
            url = urllib.parse.urlparse(self.path)
            status, answer = 200, None
            with lock:  # what to answer; answered outside, a slow client must not hold the lock
                if url.path == "/__requests__":
                    answer = str(count[0])
                elif url.path == "/__traffic__":
                    answer = json.dumps(traffic)
                elif url.path == "/__reset__":
                    count[0] = 0
                    traffic.clear()
                    storm["seen"].clear()
                    storm["since"] = 0
                    answer = "0"
                elif url.path == "/__faults__" and self.command == "POST":
                    try:
                        storm.update(_fault_settings(urllib.parse.parse_qs(url.query), storm))
                        storm["since"] = sum(storm["seen"].values())  # `limit` counts from here
                        answer = "ok"
                    except ValueError as e:
                        status, answer = 400, str(e)
                elif url.path == "/__faults__":
                    answer = json.dumps(storm["seen"])
            if answer is None:
                return False
            self._reply(status, answer.encode())
            return True

        def _forward(self) -> None:
            if self._control():
                return
            with lock:
                count[0] += 1
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            if admit is not None and signed_by(self.headers, self.path) != admit:
                return self._reply(403, _DENIED, [("Content-Type", "application/xml")])
            fault = draw(self.command, urllib.parse.urlparse(self.path).path)
            if fault in _ERRORS:
                code, message = _ERRORS[fault]
                body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>{message}</Message></Error>").encode()
                return self._reply(int(fault), body, [("Content-Type", "application/xml")])
            if fault == "reset":
                return self._reset()
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            with lock:
                seen = traffic.setdefault(urllib.parse.urlparse(self.path).path, [0, 0])
                seen[0] += 1
                seen[1] += len(data) if self.command != "HEAD" else 0
            if fault == "unanswered" or (fault == "half_body" and (self.command == "HEAD" or len(data) < 2)):
                return self._reset()
            if fault == "half_body":  # the full length announced, half of it sent
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:len(data) // 2])
                return self._reset()
            self._reply(resp.status, data, resp.getheaders())

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024  # delta-rs and s3fs open many connections at once

    Server(("127.0.0.1", port), Handler).serve_forever()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.1)


def start_moto() -> tuple[str, subprocess.Popen]:
    """moto's S3 server on 127.0.0.1 (``pip install 'moto[server]'``, a test dependency): (endpoint, process)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    _wait(f"{endpoint}/moto-api/", proc, "the moto S3 server")
    return endpoint, proc


class CountingProxy:
    """The proxy as a subprocess: ``with CountingProxy(upstream) as p: ... p.requests()`` (`admit`: see
    `serve`)."""

    def __init__(self, upstream: str, admit: str | None = None):
        self._spawn("the counting proxy", upstream, admit)

    def _spawn(self, what: str, upstream: str, *options) -> None:
        """Run ``serve(upstream, <a free port>, *options)`` in a process and wait for it to answer."""
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        args = ", ".join(repr(a) for a in (upstream, self.port, *options))
        self.proc = subprocess.Popen([sys.executable, "-c", f"from pipeline.bench.s3proxy import serve; serve({args})"])
        _wait(f"{self.endpoint}/__requests__", self.proc, what)

    def requests(self) -> int:
        """Requests forwarded since the start or the last `reset`."""
        with urllib.request.urlopen(f"{self.endpoint}/__requests__", timeout=10) as r:
            return int(r.read())

    def traffic(self, prefix: str = "/") -> tuple[int, int]:
        """(requests, response body bytes) to paths starting with `prefix` (``/<bucket>/<key prefix>``)
        since the start or the last `reset`."""
        with urllib.request.urlopen(f"{self.endpoint}/__traffic__", timeout=10) as r:
            seen = json.loads(r.read())
        hits = [v for path, v in seen.items() if path.startswith(prefix)]
        return sum(v[0] for v in hits), sum(v[1] for v in hits)

    def reset(self) -> None:
        """Zero the counts: requests, traffic and (`FaultyProxy`) faults."""
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/__reset__", method="POST"), timeout=10).read()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def __enter__(self) -> "CountingProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FaultyProxy(CountingProxy):
    """The proxy failing a share `faults` of the requests it forwards (`FAULT_KINDS`, or only
    `kinds`; seeded): ``with FaultyProxy(upstream, 0.1) as p: ... p.faults()``."""

    def __init__(self, upstream: str, faults: float = 0.0, kinds: tuple[str, ...] | None = None, seed: int = 0,
                 admit: str | None = None):
        kinds = _kinds(kinds) if kinds else None  # here, so that a bad one is not a failed start
        self._spawn("the fault-injecting proxy", upstream, admit, _rate(faults), kinds, int(seed))

    def faults(self) -> dict[str, int]:
        """Faults injected per kind since the start or the last `reset`."""
        with urllib.request.urlopen(f"{self.endpoint}/__faults__", timeout=10) as r:
            return json.loads(r.read())

    def set_faults(self, rate: float, kinds: list[str] | tuple[str, ...] | None = None,
                   seed: int | None = None, methods: list[str] | tuple[str, ...] | None = None,
                   path: str = "", limit: int = 0) -> None:
        """Fail `rate` of the requests from now on (of `kinds`, drawn from a generator seeded `seed`);
        only requests of `methods` (e.g. ``["PUT"]``) whose path contains `path`, if given, and no
        more than `limit` faults from this call on (0: no limit)."""
        query = {"rate": rate, "path": path, "limit": limit}
        if kinds:
            query["kinds"] = ",".join(kinds)
        if methods:
            query["methods"] = ",".join(methods)
        if seed is not None:
            query["seed"] = seed
        request = urllib.request.Request(f"{self.endpoint}/__faults__?{urllib.parse.urlencode(query)}", method="POST")
        urllib.request.urlopen(request, timeout=10).read()
