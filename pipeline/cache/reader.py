"""A teacher cache as an asset: its fingerprint, its manifest, and its decoded samples.

    cache = pipeline.open_cache("s3://bucket/caches/sa1b-maskclip-s24")
    cache.fingerprint["backbone"], len(cache), cache.version, cache.manifest.num_rows
    for sample in cache:           # key, image (H, W, 3) uint8, target (h, w, D) float32, meta
        ...
    pinned = pipeline.open_cache(url, version=cache.version)   # the same samples, whatever was added since

Only committed samples are read (the manifest's rows at one Delta table version), and every member
is checked against its checksum.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import tarfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pyarrow as pa

from pipeline import storage
from pipeline.storage import Storage
from pipeline.cache import shards
from pipeline.cache.encode import CorruptSample, decode_members, decode_stored  # noqa: F401  (readers' API)
from pipeline.cache.shards import shard_url  # noqa: F401  (readers' API)

log = logging.getLogger(__name__)

FORMAT = "spar-teacher-cache/2"
_VOLATILE = ("fingerprint", "project_version", "created")  # recorded, not part of the identity


class CacheError(RuntimeError):
    """A cache that is missing, empty, or not what the caller expects."""


class FingerprintMismatch(CacheError):
    """A run or reader whose teacher settings differ from those the cache was made with."""


def fingerprint_digest(fp: dict) -> str:
    """sha256 over the identity fields (everything but version and timestamps)."""
    ident = {k: v for k, v in fp.items() if k not in _VOLATILE}
    return "sha256:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def fingerprint_diff(a: dict, b: dict) -> list[str]:
    """Identity fields that differ between two fingerprints, as readable lines."""
    keys = sorted((set(a) | set(b)) - set(_VOLATILE))
    return [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


TAR_STREAM_BUFSIZE = 1 << 20  # tarfile's stream mode reads in 10 kB pieces by default: ~1 GB/s at most


def _tar_members(stream, alloc: Callable[[int], Any] = bytearray,
                 keep: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """``{fname, data}`` of every regular member, in tar order. A seekable stream (local files, s3fs
    and other fsspec files) is read member by member into a fresh writable buffer ``alloc(size)``
    (a ``bytearray`` by default) -- one copy from the file, and arrays decode in place; other
    streams go through tarfile's stream reader. Members of samples whose key `keep` refuses are
    left out: unread on a seekable stream, and never copied into a buffer."""
    from webdataset.tariterators import base_plus_ext

    seekable = getattr(stream, "seekable", lambda: False)()
    with tarfile.open(fileobj=stream, mode="r:" if seekable else "r|", bufsize=TAR_STREAM_BUFSIZE) as tar:
        for m in tar:
            if not m.isfile() or (keep is not None and not keep(base_plus_ext(m.name)[0])):
                continue
            data = alloc(m.size)
            if seekable:
                stream.seek(m.offset_data)
                got = stream.readinto(data)
            else:
                got = tar.extractfile(m).readinto(data)
            if got != m.size:
                raise tarfile.ReadError(f"{m.name}: truncated member")
            yield {"fname": m.name, "data": data}


def iter_raw_shard(url: str, store: Storage, alloc: Callable[[int], Any] = bytearray,
                   keep: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """Undecoded samples (member bytes by extension, in writable buffers made by `alloc`) of one
    shard, in tar order; only those whose key `keep` accepts, if it is given (the others are not
    read where the stream can seek). The tar is opened through `store`, so every fsspec URL is
    read with the job's options; members are grouped into samples by webdataset's key rules."""
    from webdataset.tariterators import group_by_keys

    with store.open(url, "rb") as stream:
        yield from group_by_keys(dict(m, __url__=url) for m in _tar_members(stream, alloc, keep))


def iter_shard(url: str, store: Storage, verify: bool = True) -> Iterator[dict]:
    """Decoded samples of one shard, in tar order."""
    for raw in iter_raw_shard(url, store):
        yield decode_members(raw, verify=verify)


@dataclass
class Cache:
    """A committed teacher cache at one manifest version (see `open_cache`)."""

    url: str
    fingerprint: dict
    store: Storage = field(repr=False)  # how the cache's objects are read (options of its filesystem)
    version: int  # the manifest's Delta table version this view reads: pin it to read the same samples again
    manifest: pa.Table  # one row per sample: key, source, view, shard, tar, sizes, grid, checksums, windows, run
    duplicates: pa.Table  # rows of keys committed more than once (racing writers): key, shard, run, committed
    _errors: pa.Table | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.manifest.num_rows

    @functools.cached_property
    def shards(self) -> pa.Table:
        """One row per committed shard: shard, tar, samples, bytes, sha256."""
        return shards.shard_table(self.manifest)

    @property
    def errors(self) -> pa.Table:
        """Inputs that failed and have not been committed since: key, source, latest reason."""
        if self._errors is None:
            self._errors = shards.read_errors(self.store, self.url, set(self.keys()))
        return self._errors

    def keys(self) -> list[str]:
        return self.manifest.column("key").to_pylist()

    def shard_urls(self) -> list[str]:
        """URLs of the committed shard tars."""
        return [storage.join(self.url, t) for t in self.shards.column("tar").to_pylist()]

    def __iter__(self) -> Iterator[dict]:
        return self.iter_samples()

    def iter_samples(self, verify: bool = True) -> Iterator[dict]:
        """Every committed sample once: ``{key, image, target, meta}``."""
        wanted = set(self.keys())
        for url in self.shard_urls():
            for sample in iter_shard(url, self.store, verify=verify):
                if sample["key"] in wanted:  # a key that two writers committed is yielded once
                    wanted.discard(sample["key"])
                    yield sample

    def verify(self) -> list[str]:
        """Re-hash every shard against the manifest; returns the shards that do not match (or are gone)."""
        bad = []
        for row in self.shards.to_pylist():
            digest = hashlib.sha256()
            try:
                with self.store.open(storage.join(self.url, row["tar"]), "rb") as f:
                    while chunk := f.read(16 << 20):
                        digest.update(chunk)
            except FileNotFoundError:
                bad.append(row["shard"])
                continue
            if digest.hexdigest() != row["sha256"]:
                bad.append(row["shard"])
        return bad


def read_fingerprint(url: str, store: Storage) -> dict:
    """The ``teacher.json`` of a cache, or `CacheError` if there is none."""
    path = storage.join(url, "teacher.json")
    if not store.exists(path):
        raise CacheError(f"{url} is not a teacher cache: {path} does not exist")
    return shards.read_json(store, path)


def teacher_weights(fingerprint: dict) -> tuple[str | None, int]:
    """(``pretrained`` value, init seed) that loads a cache's teacher again: its open_clip tag, its
    weights file's URL, or None with the recorded seed of a random init."""
    weights = fingerprint["weights"]
    location = {"tag": weights["value"], "random": None}.get(weights["kind"], weights.get("uri"))
    return location, int(weights.get("init_seed", 0))


def check_format(url: str, fingerprint: dict) -> None:
    """Refuse a cache of another format, naming it (nothing here reads or changes it)."""
    found = fingerprint.get("format")
    if found == FORMAT:
        return
    if found == "spar-teacher-cache/1":
        raise CacheError(
            f"{url} is a cache in format {found} (a parquet file pair per shard as its manifest); this version "
            f"reads and writes {FORMAT}, whose manifest is a Delta Lake table. Its tars are intact and untouched: "
            "re-run the cache job into a new output to rebuild it, or read it with spar-pipeline 0.1.")
    raise CacheError(f"{url}: unsupported cache format {found!r} (this version: {FORMAT})")


def open_cache(url: str, storage_options: dict | Storage | None = None, *, version: int | None = None,
               require_samples: bool = True) -> Cache:
    """Open a cache written by ``jobs/cache_teacher.py`` (local path or fsspec URL) at its latest
    manifest version, or at `version` (a pinned snapshot: exactly the samples committed up to it).

    `storage_options`: fsspec options of the cache's filesystem (endpoint, credentials), or a job's
    `Storage`; default: the filesystem's standard credentials.
    """
    store = storage_options if isinstance(storage_options, Storage) else Storage(dict(storage_options or {}))
    url = storage.resolve(url)
    fp = read_fingerprint(url, store)
    check_format(url, fp)
    samples, found, duplicates = shards.read_manifest(store, url, version)
    if require_samples and samples.num_rows == 0:
        raise CacheError(f"{url} holds no committed samples (has the cache job finished a shard yet?)")
    return Cache(url=url, fingerprint=fp, store=store, version=found, manifest=samples, duplicates=duplicates)
