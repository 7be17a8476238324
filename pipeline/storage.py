"""One storage layer over fsspec: every location is a URL (``/dir``, ``file://``, ``s3://``, ``gs://``).

Local paths take the plain ``os`` route (atomic renames, no fsspec overhead); everything else goes
through ``fsspec.url_to_fs``. Credentials come from each filesystem's standard provider chain
(instance roles, environment, profiles) or from `storage_options` given at runtime; this module
never writes them anywhere. For S3-compatible servers set ``AWS_ENDPOINT_URL`` (or pass
``storage_options={"endpoint_url": ...}``).
"""
from __future__ import annotations

import os
import shutil
import urllib.parse
import uuid
from typing import IO, Any, Iterator

import fsspec

from spar.weights import public_url  # noqa: F401  (one definition, shared with the model library)

_OPTIONS: dict[str, dict] = {}  # per-protocol storage options set by `configure`
# Many processes write the same prefixes: a cached listing would hide their objects.
_DEFAULTS = {p: {"use_listings_cache": False} for p in ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")}


def configure(protocol: str, options: dict[str, Any] | None) -> None:
    """Default fsspec options for a protocol (e.g. ``{"endpoint_url": ...}`` for s3) in this process."""
    _OPTIONS[protocol] = dict(options or {})


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


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or path with ``/``."""
    out = str(url).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path of `url`."""
    proto = protocol(url)
    if proto == "file":
        return fsspec.filesystem("file"), os.path.abspath(local_path(url))
    options = {**_DEFAULTS.get(proto, {}), **_OPTIONS.get(proto, {})}
    fs, path = fsspec.core.url_to_fs(str(url), **options)
    return fs, path


def _url(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    proto = protocol(like)
    return path if proto == "file" else f"{proto}://{path}"


def open_file(url: str, mode: str = "rb") -> IO:
    """Open a file for reading or writing (local writes create parent dirs)."""
    if is_local(url):
        path = local_path(url)
        if "w" in mode or "a" in mode:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return open(path, mode)
    fs, path = filesystem(url)
    return fs.open(path, mode)


def exists(url: str) -> bool:
    """Whether a file or directory exists at `url`."""
    if is_local(url):
        return os.path.exists(local_path(url))
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    """The whole content of a file."""
    with open_file(url, "rb") as f:
        return f.read()


def read_text(url: str) -> str:
    """The whole content of a UTF-8 text file."""
    return read_bytes(url).decode("utf-8")


def write_bytes(url: str, data: bytes) -> None:
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
    fs, path = filesystem(url)
    fs.pipe_file(path, data)


def write_text(url: str, text: str) -> None:
    """`write_bytes` for UTF-8 text."""
    write_bytes(url, text.encode("utf-8"))


def upload(local: str, url: str) -> None:
    """Copy a local file to `url` (a rename when `url` is local too)."""
    if is_local(url):
        dst = local_path(url)
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        tmp = f"{dst}.part{uuid.uuid4().hex[:8]}"
        shutil.copyfile(local, tmp)
        os.replace(tmp, dst)
        return
    fs, path = filesystem(url)
    fs.put_file(local, path)


def download(url: str, local: str) -> None:
    """Copy `url` to a local file."""
    if is_local(url):
        shutil.copyfile(local_path(url), local)
        return
    fs, path = filesystem(url)
    fs.get_file(path, local)


def remove(url: str, recursive: bool = False) -> None:
    """Delete a file (or a tree with `recursive`); missing paths are fine."""
    if is_local(url):
        path = local_path(url)
        if os.path.isdir(path) and recursive:
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)
        return
    fs, path = filesystem(url)
    try:
        fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass


def makedirs(url: str) -> None:
    """Create a directory (object stores have no directories: a no-op there)."""
    if is_local(url):
        os.makedirs(local_path(url), exist_ok=True)


def list_files(url: str, suffixes: tuple[str, ...] | None = None, recursive: bool = True) -> list[str]:
    """Sorted URLs of the files under `url` (optionally only those ending in `suffixes`, case-insensitive)."""
    fs, path = filesystem(url)
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
    return sorted(_url(fs, p, url) for p in found)


def size(url: str) -> int:
    """Size of a file in bytes."""
    if is_local(url):
        return os.path.getsize(local_path(url))
    fs, path = filesystem(url)
    return int(fs.size(path))
