"""One storage layer over fsspec: every location is a URL (``/dir``, ``file://``, ``s3://``, ``gs://``).

A `Storage` is the storage context of a job: the fsspec options (endpoint, credentials, ...) that
every read and write of that job uses. It is a small picklable value, built once from the job's
``storage_options`` and passed explicitly to every stage, Ray task, actor and loader process that
touches storage, so the same options apply everywhere whatever process does the I/O::

    store = Storage({"endpoint_url": "http://127.0.0.1:9000", "key": "...", "secret": "..."})
    store.write_text("s3://bucket/x.txt", "hello")

Options are flat fsspec keyword arguments for the object stores (s3, gs, az, ...), or a mapping
per protocol (``{"s3": {...}, "gs": {...}}``), plus one ``retry`` mapping (`pipeline.retry.RetryPolicy`:
``{"deadline_s": 300}``) that every remote operation runs under: transient errors (throttling,
5xx, resets, timeouts, bodies cut short) are retried with backoff, streamed reads resume at their
byte offset, permanent ones fail at once with the URL named. Without options, each filesystem uses its standard
provider chain (instance roles, environment, profiles). Local paths take the plain ``os`` route
(atomic renames, no fsspec overhead). Nothing here writes options anywhere, and a `Storage`'s
repr hides them.

The module-level functions are pure URL arithmetic: no I/O, no options.
"""
from __future__ import annotations

import http.client
import io
import logging
import os
import shutil
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import IO, Any, Iterator

import fsspec

from pipeline import retry
from pipeline.retry import RetryPolicy
from spar import weights as _weights
from spar.weights import public_url  # noqa: F401  (one definition, shared with the model library)

log = logging.getLogger(__name__)

OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
_ALIASES = {"s3a": "s3", "gcs": "gs", "abfss": "abfs"}  # per-protocol options may name either spelling
# Many processes write the same prefixes: a cached listing would hide their objects.
_DEFAULTS = {p: {"use_listings_cache": False} for p in OBJECT_STORES}


def protocol(url: str) -> str:
    """``file`` for local paths, else the URL scheme."""
    scheme = urllib.parse.urlparse(str(url)).scheme
    return "file" if len(scheme) <= 1 else scheme


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs."""
    return protocol(url) == "file"


def local_path(url: str) -> str:
    """The filesystem path of a local URL."""
    url = str(url)
    return urllib.parse.urlparse(url).path if url.startswith("file://") else url


def resolve(url: str) -> str:
    """The absolute form of a location, to be fixed on the driver before it travels to other
    processes: local paths (and ``file://``) become absolute paths, ``~`` expanded; URLs are kept."""
    if not url or not is_local(url):
        return url
    return os.path.abspath(os.path.expanduser(local_path(url)))


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or path with ``/``."""
    out = str(url).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


@dataclass(frozen=True)
class Storage:
    """The storage context of a job: fsspec options for every remote URL it reads or writes."""

    options: dict[str, Any] = field(default_factory=dict, repr=False)
    policy: RetryPolicy = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "policy", RetryPolicy.from_options(self.options.get("retry")))

    @property
    def per_protocol(self) -> bool:
        """Whether the options are a mapping per protocol (``{"s3": {...}}``) rather than flat
        (flat options may hold dicts of their own, such as s3fs's ``client_kwargs``)."""
        opts = {k: v for k, v in self.options.items() if k != "retry"}
        return bool(opts) and all(isinstance(v, dict) and k in fsspec.available_protocols() for k, v in opts.items())

    def call(self, operation: str, url: str, fn, on_retry=None):
        """``fn()`` under this storage's retry policy (`pipeline.retry.call`): for remote I/O that
        is not one of the methods below (a library's own client, such as delta-rs's)."""
        return retry.call(self.policy, operation, str(url), fn, on_retry)

    def options_for(self, url: str) -> dict[str, Any]:
        """The fsspec options that apply to `url` (``{}`` for local paths and other protocols)."""
        proto = protocol(url)
        if proto == "file":
            return {}
        if self.per_protocol:
            return dict(self.options.get(proto) or self.options.get(_ALIASES.get(proto, proto)) or {})
        return {k: v for k, v in self.options.items() if k != "retry"} if proto in OBJECT_STORES else {}

    def weights_options(self, url: str) -> dict[str, Any]:
        """The options to hand the model library for a weights file at `url`: the URL's filesystem
        options and this storage's retry policy (`open_weights` applies both)."""
        return {**self.options_for(url), **({"retry": self.options["retry"]} if "retry" in self.options else {})}

    def filesystem(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem and in-filesystem path of `url`."""
        proto = protocol(url)
        if proto == "file":
            return fsspec.filesystem("file"), os.path.abspath(local_path(url))
        fs, path = fsspec.core.url_to_fs(str(url), **{**_DEFAULTS.get(proto, {}), **self.options_for(url)})
        if proto in ("s3", "s3a") and retry.enabled():
            _count_client_faults(fs)
        return fs, path

    def open(self, url: str, mode: str = "rb", **kwargs) -> IO:
        """Open a file for reading or writing (local writes create parent dirs). `kwargs` go to the
        remote filesystem's ``open`` (e.g. ``block_size``) and are ignored for local files.

        A remote file opened for reading resumes where it stopped when a read fails transiently
        (a stream cut mid-way continues from its byte offset). One opened for writing (``wb``) is
        spooled to a local temp file and uploaded whole when it is closed (`upload`: retried,
        size-checked), and not at all if the ``with`` block raised: never half-visible."""
        if is_local(url):
            path = local_path(url)
            if "w" in mode or "a" in mode:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            return open(path, mode)
        if mode == "wb":
            return _UploadOnClose(self, url)
        if mode not in ("rb", "r"):
            raise ValueError(f"{url}: remote files open as 'rb', 'r' or 'wb', not {mode!r}")
        if not retry.enabled():
            fs, path = self.filesystem(url)
            return fs.open(path, mode, **kwargs)
        reader = io.BufferedReader(_ResumingReader(self, url, kwargs), buffer_size=1 << 20)
        return io.TextIOWrapper(reader, encoding="utf-8") if mode == "r" else reader

    def exists(self, url: str) -> bool:
        """Whether a file or directory exists at `url`."""
        if is_local(url):
            return os.path.exists(local_path(url))
        fs, path = self.filesystem(url)
        return self.call("exists", url, lambda: fs.exists(path))

    def read_bytes(self, url: str) -> bytes:
        """The whole content of a file."""
        if is_local(url):
            with open(local_path(url), "rb") as f:
                return f.read()
        fs, path = self.filesystem(url)
        return self.call("read", url, lambda: fs.cat_file(path))

    def read_range(self, url: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file: one ranged GET on object stores (a short answer, from a
        body cut mid-way, is read again)."""
        if is_local(url):
            with open(local_path(url), "rb") as f:
                f.seek(start)
                return f.read(end - start)
        fs, path = self.filesystem(url)

        def get() -> bytes:
            data = fs.cat_file(path, start=start, end=end)
            if len(data) != end - start and start + len(data) < self.size(url):
                raise http.client.IncompleteRead(data, end - start - len(data))
            return data

        return self.call("read", url, get)

    def read_text(self, url: str) -> str:
        """The whole content of a UTF-8 text file."""
        return self.read_bytes(url).decode("utf-8")

    def write_bytes(self, url: str, data: bytes) -> None:
        """Write a whole file atomically: readers see the old content or the new, never a part.

        Local: write a temp file, then ``os.replace``. Object stores: one PUT is already atomic.
        """
        if is_local(url):
            _write_local(url, lambda f: f.write(data))
            return
        fs, path = self.filesystem(url)
        self.call("write", url, lambda: fs.pipe_file(path, data))

    def write_text(self, url: str, text: str) -> None:
        """`write_bytes` for UTF-8 text."""
        self.write_bytes(url, text.encode("utf-8"))

    def upload(self, local: str, url: str) -> None:
        """Copy a local file to `url` (a rename when `url` is local too)."""
        if is_local(url):
            def copy(f) -> None:
                with open(local, "rb") as src:
                    shutil.copyfileobj(src, f, 16 << 20)

            _write_local(url, copy)
            return
        fs, path = self.filesystem(url)
        size = os.path.getsize(local)

        def put() -> None:
            fs.put_file(local, path)
            self._check_size(url, size)

        self.call("write", url, put)

    def write_stream(self, url: str, produce) -> Any:
        """Write a file by ``produce(f)`` writing into the binary file `f`, and return what it
        returns; `produce` must write the same bytes each time it is called. Never half-visible:
        locally a temp file is renamed; remotely a failed upload is aborted (no object appears
        under `url`), and a finished one is checked for its size before this returns. A transient
        failure writes it again, under the retry policy."""
        if is_local(url):
            return _write_local(url, produce)
        fs, path = self.filesystem(url)

        def write() -> Any:
            f = fs.open(path, "wb")
            counted = _CountingWriter(f)
            try:
                out = produce(counted)
            except BaseException:
                _abort(f)
                raise
            f.close()  # completes the upload: the object appears whole, or not at all
            self._check_size(url, counted.n)
            return out

        return self.call("write", url, write)  # a retry overwrites: nothing to remove first (another
        # writer may have put the same content-named object there, and committed it)

    def _check_size(self, url: str, size: int) -> None:
        """Raise a transient error if the object at `url` is not `size` bytes (an upload whose last
        answer was lost, then retried, or a store that acknowledged what it did not keep)."""
        if not retry.enabled():
            return
        fs, path = self.filesystem(url)
        found = fs.info(path).get("size")
        if found != size:
            raise http.client.IncompleteRead(b"", size - int(found or 0))

    def download(self, url: str, local: str) -> None:
        """Copy `url` to a local file."""
        if is_local(url):
            shutil.copyfile(local_path(url), local)
            return
        fs, path = self.filesystem(url)
        self.call("read", url, lambda: fs.get_file(path, local))

    def remove(self, url: str, recursive: bool = False) -> None:
        """Delete a file (or a tree with `recursive`); missing paths are fine."""
        if is_local(url):
            path = local_path(url)
            if os.path.isdir(path) and recursive:
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.remove(path)
            return
        fs, path = self.filesystem(url)

        def rm() -> None:
            try:
                fs.rm(path, recursive=recursive)
            except FileNotFoundError:
                pass

        self.call("delete", url, rm)

    def makedirs(self, url: str) -> None:
        """Create a directory (object stores have no directories: a no-op there)."""
        if is_local(url):
            os.makedirs(local_path(url), exist_ok=True)

    def list_files(self, url: str, suffixes: tuple[str, ...] | None = None, recursive: bool = True) -> list[str]:
        """Sorted URLs of the files under `url` (optionally only those ending in `suffixes`, case-insensitive)."""
        fs, path = self.filesystem(url)

        def listing() -> list[str]:
            if not fs.exists(path):
                return []
            if fs.isfile(path):
                return [path]
            if recursive:
                return fs.find(path)
            return [p["name"] for p in fs.ls(path, detail=True) if p["type"] == "file"]

        found = listing() if is_local(url) else self.call("list", url, listing)
        if suffixes:
            found = [p for p in found if p.lower().endswith(tuple(s.lower() for s in suffixes))]
        proto = protocol(url)
        return sorted(p if proto == "file" else f"{proto}://{p}" for p in found)

    def iter_files(self, url: str, suffixes: tuple[str, ...] | None = None, page: int = 10_000) -> Iterator[list[str]]:
        """The URLs of the files under `url` as `list_files` names them, a page of at most `page` at a
        time, unsorted. On S3 the listing is read page by page and kept by no one (`list_files`
        would hold every object's detail dict, and s3fs would cache them), so listing millions of
        objects costs what the caller keeps of them."""
        ends = tuple(s.lower() for s in suffixes) if suffixes else None
        fs, path = self.filesystem(url)
        proto = protocol(url)
        if (proto not in ("s3", "s3a") or not hasattr(fs, "_call_s3")
                or self.call("list", url, lambda: not fs.exists(path) or fs.isfile(path))):
            found = self.list_files(url, suffixes)
            for lo in range(0, len(found), page):
                yield found[lo:lo + page]
            return
        from fsspec.asyn import sync

        bucket, _, prefix = path.partition("/")
        request = {"Bucket": bucket, "Prefix": prefix.rstrip("/") + "/" if prefix else ""}
        names: list[str] = []
        while True:  # one ListObjectsV2 page (1,000 keys) a request, each retried on its own
            answer = self.call("list", url, lambda: sync(fs.loop, fs._call_s3, "list_objects_v2", **request))
            for item in answer.get("Contents", []):
                if ends is None or item["Key"].lower().endswith(ends):
                    names.append(f"{proto}://{bucket}/{item['Key']}")
            while len(names) >= page:
                yield names[:page]
                names = names[page:]
            if not answer.get("IsTruncated"):
                break
            request["ContinuationToken"] = answer["NextContinuationToken"]
        if names:
            yield names

    def relative(self, url: str, base: str) -> str:
        """The path of `url` below `base`, ``/``-separated (both listed by this storage)."""
        root = self.filesystem(base)[1].rstrip("/") + "/"
        path = self.filesystem(url)[1]
        if not path.startswith(root):
            raise ValueError(f"{url} is not under {base}")
        return path[len(root):]

    def size(self, url: str) -> int:
        """Size of a file in bytes."""
        if is_local(url):
            return os.path.getsize(local_path(url))
        fs, path = self.filesystem(url)
        return int(self.call("stat", url, lambda: fs.size(path)))

    def modified(self, url: str) -> float:
        """Last modification time of a file, in seconds since the epoch."""
        if is_local(url):
            return os.path.getmtime(local_path(url))
        fs, path = self.filesystem(url)
        info = self.call("stat", url, lambda: fs.info(path))
        stamp = info.get("LastModified") or info.get("mtime") or info.get("updated") or info.get("created")
        if stamp is None:
            raise OSError(f"{url}: the filesystem reports no modification time")
        if isinstance(stamp, (int, float)):
            return float(stamp)
        if isinstance(stamp, str):
            import datetime

            stamp = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        return stamp.timestamp()

    def pyarrow_filesystem(self, url: str):
        """(a pyarrow filesystem, path) for libraries that take pyarrow's (Ray Train's checkpoints):
        the same fsspec filesystem, options and retry policy as every other read and write (a file
        written through it is uploaded whole when closed, never half-visible)."""
        from pyarrow.fs import PyFileSystem

        fs, path = self.filesystem(url)
        return PyFileSystem(_retrying_handler(self, url, fs)), path


def _count_client_faults(fs) -> None:
    """Count, with this layer's retries, the requests of `fs`'s S3 client that failed transiently
    (as ``s3 <Operation>/<kind>``): botocore and s3fs retry those themselves, and would otherwise
    carry a fault storm unseen. Hooked once per client (fsspec keeps one filesystem per options and
    process): connects it now, as its first request would."""
    if getattr(fs, "_s3", None) is None:
        fs.connect()
    client = fs._s3
    if getattr(fs, "_spar_counted", None) is not client:
        client.meta.events.register("needs-retry.s3", _client_fault)
        fs._spar_counted = client


def _client_fault(response=None, caught_exception=None, operation=None, **_) -> None:
    """botocore's ``needs-retry`` event, after every attempt of a request: count a transient failure
    (decides nothing: botocore's own handler decides whether to retry)."""
    if caught_exception is not None:
        kind = retry.classify(caught_exception)
    elif response is not None and response[0].status_code >= 400:
        error = (response[1] or {}).get("Error") or {}
        kind = retry.code_kind(str(error.get("Code") or response[0].status_code))
    else:
        return
    if kind is not None:
        retry.record(f"s3 {getattr(operation, 'name', 'request')}", kind)


def open_weights(url: str, storage_options: dict | None) -> IO[bytes]:
    """How the model library opens a remote weights file in the project's processes: under the
    retry policy, a download cut mid-way resuming at its byte offset. `storage_options` are the
    URL's own filesystem options (`Storage.weights_options`), with the job's ``retry`` policy."""
    options = dict(storage_options or {})
    policy = options.pop("retry", None)
    return Storage({protocol(url): options, **({"retry": policy} if policy else {})}).open(url, "rb")


_weights.use_remote_reader(open_weights)


def _write_local(url: str, produce) -> Any:
    """``produce(f)`` into a temp file beside the local path of `url`, renamed over it when done
    (readers see the old file or the new, never a part; a failure leaves neither the file nor the
    temp); returns what `produce` returns."""
    path = local_path(url)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.part{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            out = produce(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


class _ResumingReader(io.RawIOBase):
    """A remote file read through the retry policy: a read that fails transiently (a reset, a body
    cut mid-way, a 503) reopens the object at the offset it had reached and goes on, so a stream of
    any length survives any number of faults, each retried under the deadline on its own."""

    def __init__(self, store: Storage, url: str, kwargs: dict):
        super().__init__()
        self.store, self.url, self.kwargs = store, url, kwargs
        self.fs, self.path = store.filesystem(url)
        self.pos, self._f = 0, None
        self._file()  # open now: a missing object fails here, as a plain open does

    def _file(self):
        if self._f is None:
            def reopen():
                f = self.fs.open(self.path, "rb", **self.kwargs)
                if self.pos:
                    f.seek(self.pos)
                return f
            self._f = self.store.call("open", self.url, reopen)
        return self._f

    def _drop(self, _e=None) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - a broken file; a new one replaces it
                pass

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self.pos
        elif whence == io.SEEK_END:
            offset += self._file().size
        self.pos = max(0, offset)
        if self._f is not None:
            self._f.seek(self.pos)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        def chunk() -> bytes:
            f = self._file()
            f.seek(self.pos)
            return f.read(n)

        data = self.store.call("read", self.url, chunk, on_retry=self._drop)
        self.pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._drop()
        super().close()


class _CountingWriter(io.RawIOBase):
    """Counts the bytes written through to `f`."""

    def __init__(self, f):
        super().__init__()
        self.f, self.n = f, 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.f.write(b)
        self.n += len(b)
        return len(b)


def _abort(f) -> None:
    """Abandon a remote file being written, so no object appears (s3fs aborts its multipart
    upload; other filesystems at least drop the buffer)."""
    try:
        if hasattr(f, "discard"):
            f.discard()
        f.closed = True  # fsspec's buffered files: closing would complete the upload
    except Exception as e:  # noqa: BLE001 - a broken upload; nothing to keep
        log.info("could not abort an upload cleanly: %s", e)


def _retrying_handler(store: Storage, url: str, fs):
    """A pyarrow ``FSSpecHandler`` over `fs` whose every call runs under `store`'s retry policy:
    reads resume (`_ResumingReader`), and an output stream is spooled to a local file and uploaded
    when closed (`Storage.upload`: retried, size-checked), so a failed checkpoint write leaves no
    partial file for a resume to pick up."""
    from pyarrow import PythonFile
    from pyarrow.fs import FSSpecHandler

    proto = protocol(url)

    def full(path: str) -> str:
        return path if proto == "file" else f"{proto}://{path}"

    class Handler(FSSpecHandler):
        def __init__(self):
            super().__init__(fs)

        def __eq__(self, other):
            return isinstance(other, Handler) and other.fs is self.fs

        def __ne__(self, other):
            return not self == other

        def get_file_info(self, paths):
            return store.call("stat", url, lambda: super(Handler, self).get_file_info(paths))

        def get_file_info_selector(self, selector):
            return store.call("list", full(selector.base_dir), lambda: super(Handler, self).get_file_info_selector(selector))

        def delete_dir_contents(self, path, missing_dir_ok=False):
            store.call("delete", full(path), lambda: super(Handler, self).delete_dir_contents(path, missing_dir_ok))

        def delete_file(self, path):
            store.call("delete", full(path), lambda: super(Handler, self).delete_file(path))

        def delete_dir(self, path):
            store.call("delete", full(path), lambda: super(Handler, self).delete_dir(path))

        def copy_file(self, src, dest):
            store.call("write", full(dest), lambda: super(Handler, self).copy_file(src, dest))

        def open_input_stream(self, path):
            return PythonFile(store.open(full(path), "rb"), mode="r")

        def open_input_file(self, path):
            return PythonFile(store.open(full(path), "rb"), mode="r")

        def open_output_stream(self, path, metadata):
            return PythonFile(_UploadOnClose(store, full(path)), mode="w")

    return Handler()


class _UploadOnClose(io.RawIOBase):
    """A file written locally (a temp file) and uploaded to `url` by `Storage.upload` when closed."""

    def __init__(self, store: Storage, url: str):
        import tempfile

        super().__init__()
        self.store, self.url = store, url
        self.local = tempfile.NamedTemporaryFile(prefix="spar-upload-", delete=False)

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return self.local.write(b)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.local.close()
            self.store.upload(self.local.name, self.url)
        finally:
            self.discard()

    def discard(self) -> None:
        """Drop what was written: nothing is uploaded."""
        if not self.local.closed:
            self.local.close()
        if os.path.exists(self.local.name):
            os.remove(self.local.name)
        super().close()

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:  # the writer failed: upload nothing
            self.discard()
        else:
            self.close()
