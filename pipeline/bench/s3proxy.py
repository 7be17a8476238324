"""A local S3 server (moto's, for benchmarks and tests) and a counting HTTP proxy in front of any
S3-compatible server: how many storage requests an operation costs, whatever client makes them
(s3fs, delta-rs). Both run as processes of their own (clients that hold the GIL while they wait on
the network must not share a process with the server).

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
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


def serve(upstream: str, port: int, admit: str | None = None) -> None:
    """Forward every request to `upstream`, counting them (blocks); with `admit`, only those signed
    with that access key id (others: 403 AccessDenied)."""
    target = urllib.parse.urlparse(upstream)
    lock, count, traffic = threading.Lock(), [0], {}  # traffic: path -> [requests, response body bytes]

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

        def _forward(self) -> None:
            if self.path == "/__requests__":
                return self._reply(200, str(count[0]).encode())
            if self.path == "/__traffic__":
                with lock:
                    return self._reply(200, json.dumps(traffic).encode())
            if self.path == "/__reset__":
                with lock:
                    count[0] = 0
                    traffic.clear()
                return self._reply(200, b"0")
            with lock:
                count[0] += 1
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            if admit is not None and signed_by(self.headers, self.path) != admit:
                return self._reply(403, _DENIED, [("Content-Type", "application/xml")])
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
            self._reply(resp.status, data, resp.getheaders())

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def _free_port() -> int:
    import socket

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
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        code = f"from pipeline.bench.s3proxy import serve; serve({upstream!r}, {self.port}, {admit!r})"
        self.proc = subprocess.Popen([sys.executable, "-c", code])
        _wait(f"{self.endpoint}/__requests__", self.proc, "the counting proxy")

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
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/__reset__", method="POST"), timeout=10).read()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def __enter__(self) -> "CountingProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
