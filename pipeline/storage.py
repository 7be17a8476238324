"""One storage layer over fsspec: every location is a URL (``/dir``, ``file://``, ``s3://``, ``gs://``).

A `Storage` is the storage context of a job: the fsspec options (endpoint, credentials, ...) that
every read and write of that job uses. It is a small picklable value, built once from the job's
``storage_options`` and passed explicitly to every stage, Ray task, actor and loader process that
touches storage, so the same options apply everywhere whatever process does the I/O::

    store = Storage({"endpoint_url": "http://127.0.0.1:9000", "key": "...", "secret": "..."})
    store.write_text("s3://bucket/x.txt", "hello")

Options are flat fsspec keyword arguments for the object stores (s3, gs, az, ...), or a mapping
per protocol (``{"s3": {...}, "gs": {...}}``). Without options, each filesystem uses its standard
provider chain (instance roles, environment, profiles). Local paths take the plain ``os`` route
(atomic renames, no fsspec overhead). Nothing here writes options anywhere, and a `Storage`'s
repr hides them.

The module-level functions are pure URL arithmetic: no I/O, no options.
"""
from __future__ import annotations

import os
import shutil
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import IO, Any, Iterator

import fsspec

from spar.weights import public_url  # noqa: F401  (one definition, shared with the model library)

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

    @property
    def per_protocol(self) -> bool:
        """Whether the options are a mapping per protocol (``{"s3": {...}}``) rather than flat
        (flat options may hold dicts of their own, such as s3fs's ``client_kwargs``)."""
        return bool(self.options) and all(
            isinstance(v, dict) and k in fsspec.available_protocols() for k, v in self.options.items())

    def options_for(self, url: str) -> dict[str, Any]:
        """The fsspec options that apply to `url` (``{}`` for local paths and other protocols)."""
        proto = protocol(url)
        if proto == "file":
            return {}
        if self.per_protocol:
            return dict(self.options.get(proto) or self.options.get(_ALIASES.get(proto, proto)) or {})
        return dict(self.options) if proto in OBJECT_STORES else {}

    def filesystem(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem and in-filesystem path of `url`."""
        proto = protocol(url)
        if proto == "file":
            return fsspec.filesystem("file"), os.path.abspath(local_path(url))
        return fsspec.core.url_to_fs(str(url), **{**_DEFAULTS.get(proto, {}), **self.options_for(url)})

    def open(self, url: str, mode: str = "rb", **kwargs) -> IO:
        """Open a file for reading or writing (local writes create parent dirs). `kwargs` go to the
        remote filesystem's ``open`` (e.g. ``block_size``) and are ignored for local files."""
        if is_local(url):
            path = local_path(url)
            if "w" in mode or "a" in mode:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            return open(path, mode)
        fs, path = self.filesystem(url)
        return fs.open(path, mode, **kwargs)

    def exists(self, url: str) -> bool:
        """Whether a file or directory exists at `url`."""
        if is_local(url):
            return os.path.exists(local_path(url))
        fs, path = self.filesystem(url)
        return fs.exists(path)

    def read_bytes(self, url: str) -> bytes:
        """The whole content of a file."""
        with self.open(url, "rb") as f:
            return f.read()

    def read_range(self, url: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file: one ranged GET on object stores."""
        if is_local(url):
            with open(local_path(url), "rb") as f:
                f.seek(start)
                return f.read(end - start)
        fs, path = self.filesystem(url)
        return fs.cat_file(path, start=start, end=end)

    def read_text(self, url: str) -> str:
        """The whole content of a UTF-8 text file."""
        return self.read_bytes(url).decode("utf-8")

    def write_bytes(self, url: str, data: bytes) -> None:
        """Write a whole file atomically: readers see the old content or the new, never a part.

        Local: write a temp file, then ``os.replace``. Object stores: one PUT is already atomic.
        """
        if is_local(url):
            path = local_path(url)
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            tmp = f"{path}.part{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            return
        fs, path = self.filesystem(url)
        fs.pipe_file(path, data)

    def write_text(self, url: str, text: str) -> None:
        """`write_bytes` for UTF-8 text."""
        self.write_bytes(url, text.encode("utf-8"))

    def upload(self, local: str, url: str) -> None:
        """Copy a local file to `url` (a rename when `url` is local too)."""
        if is_local(url):
            dst = local_path(url)
            os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
            tmp = f"{dst}.part{uuid.uuid4().hex[:8]}"
            shutil.copyfile(local, tmp)
            os.replace(tmp, dst)
            return
        fs, path = self.filesystem(url)
        fs.put_file(local, path)

    def download(self, url: str, local: str) -> None:
        """Copy `url` to a local file."""
        if is_local(url):
            shutil.copyfile(local_path(url), local)
            return
        fs, path = self.filesystem(url)
        fs.get_file(path, local)

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
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass

    def makedirs(self, url: str) -> None:
        """Create a directory (object stores have no directories: a no-op there)."""
        if is_local(url):
            os.makedirs(local_path(url), exist_ok=True)

    def list_files(self, url: str, suffixes: tuple[str, ...] | None = None, recursive: bool = True) -> list[str]:
        """Sorted URLs of the files under `url` (optionally only those ending in `suffixes`, case-insensitive)."""
        fs, path = self.filesystem(url)
        if not fs.exists(path):
            return []
        if fs.isfile(path):
            found = [path]
        elif recursive:
            found = fs.find(path)
        else:
            found = [p["name"] for p in fs.ls(path, detail=True) if p["type"] == "file"]
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
        if proto not in ("s3", "s3a") or not hasattr(fs, "_iterdir") or not fs.exists(path) or fs.isfile(path):
            found = self.list_files(url, suffixes)
            for lo in range(0, len(found), page):
                yield found[lo:lo + page]
            return
        from fsspec.asyn import sync

        bucket, _, prefix = path.partition("/")
        entries = fs._iterdir(bucket, delimiter="", prefix=prefix.rstrip("/") + "/" if prefix else "")

        async def next_page() -> list[str]:
            names = []
            async for info in entries:
                if info["type"] == "file" and (ends is None or info["name"].lower().endswith(ends)):
                    names.append(f"{proto}://{info['name']}")
                    if len(names) >= page:
                        break
            return names

        while names := sync(fs.loop, next_page):
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
        return int(fs.size(path))

    def modified(self, url: str) -> float:
        """Last modification time of a file, in seconds since the epoch."""
        if is_local(url):
            return os.path.getmtime(local_path(url))
        fs, path = self.filesystem(url)
        info = fs.info(path)
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
        the same fsspec filesystem and options as every other read and write."""
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, path = self.filesystem(url)
        return PyFileSystem(FSSpecHandler(fs)), path
