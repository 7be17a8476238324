"""A teacher cache as an asset: its fingerprint, its manifest, and its decoded samples.

    cache = pipeline.open_cache("s3://bucket/caches/sa1b-maskclip-s24")
    cache.fingerprint["backbone"], len(cache), cache.manifest.num_rows
    for sample in cache:           # key, image (H, W, 3) uint8, target (h, w, D) float32, meta
        ...

Only committed shards are read, and every member is checked against its checksum.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa

from pipeline import storage
from pipeline.storage import Storage
from pipeline.cache import shards
from pipeline.cache.encode import CorruptSample, decode_members, decode_stored  # noqa: F401  (readers' API)
from pipeline.cache.shards import shard_url  # noqa: F401  (readers' API)

log = logging.getLogger(__name__)

FORMAT = "spar-teacher-cache/1"
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


def iter_raw_shard(url: str, store: Storage) -> Iterator[dict]:
    """Undecoded samples (member bytes by extension) of one shard, in tar order. The tar is opened
    through `store` and streamed into webdataset's tar expander, so it reads every fsspec URL with
    the job's options."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with store.open(url, "rb") as stream:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))


def iter_shard(url: str, store: Storage, verify: bool = True) -> Iterator[dict]:
    """Decoded samples of one shard, in tar order."""
    for raw in iter_raw_shard(url, store):
        yield decode_members(raw, verify=verify)


@dataclass
class Cache:
    """A committed teacher cache (see `open_cache`)."""

    url: str
    fingerprint: dict
    store: Storage = field(repr=False)  # how the cache's objects are read (options of its filesystem)
    manifest: pa.Table  # one row per sample: key, source, view, shard, sizes, grid, checksum, windows
    shards: pa.Table  # one row per committed shard: shard, samples, bytes, sha256
    _errors: pa.Table | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.manifest.num_rows

    @property
    def errors(self) -> pa.Table:
        """Inputs the latest run skipped: key, source, reason."""
        if self._errors is None:
            self._errors = shards.read_errors(self.store, self.url)
        return self._errors

    def keys(self) -> list[str]:
        return self.manifest.column("key").to_pylist()

    def shard_urls(self) -> list[str]:
        """URLs of the committed shard tars."""
        return [shards.shard_url(self.url, n) for n in self.shards.column("shard").to_pylist()]

    def __iter__(self) -> Iterator[dict]:
        return self.iter_samples()

    def iter_samples(self, verify: bool = True) -> Iterator[dict]:
        """Every committed sample once: ``{key, image, target, meta}``."""
        wanted = set(self.keys())
        for url in self.shard_urls():
            for sample in iter_shard(url, self.store, verify=verify):
                if sample["key"] in wanted:  # a key duplicated by a retried batch is yielded once
                    wanted.discard(sample["key"])
                    yield sample

    def verify(self) -> list[str]:
        """Re-hash every shard against the manifest; returns the shards that do not match."""
        bad = []
        for name, sha in zip(self.shards.column("shard").to_pylist(), self.shards.column("sha256").to_pylist()):
            digest = hashlib.sha256()
            with self.store.open(shards.shard_url(self.url, name), "rb") as f:
                while chunk := f.read(16 << 20):
                    digest.update(chunk)
            if digest.hexdigest() != sha:
                bad.append(name)
        return bad


def read_fingerprint(url: str, store: Storage) -> dict:
    """The ``teacher.json`` of a cache, or `CacheError` if there is none."""
    path = storage.join(url, "teacher.json")
    if not store.exists(path):
        raise CacheError(f"{url} is not a teacher cache: {path} does not exist")
    return shards.read_json(store, path)


def open_cache(url: str, storage_options: dict | Storage | None = None, *, require_samples: bool = True) -> Cache:
    """Open a cache written by ``jobs/cache_teacher.py`` (local path or fsspec URL).

    `storage_options`: fsspec options of the cache's filesystem (endpoint, credentials), or a job's
    `Storage`; default: the filesystem's standard credentials.
    """
    store = storage_options if isinstance(storage_options, Storage) else Storage(dict(storage_options or {}))
    url = storage.resolve(url)
    fp = read_fingerprint(url, store)
    if fp.get("format") != FORMAT:
        raise CacheError(f"{url}: unsupported cache format {fp.get('format')!r} (this reader: {FORMAT})")
    samples, shard_table = shards.read_manifest(store, url)
    if require_samples and samples.num_rows == 0:
        raise CacheError(f"{url} holds no committed samples (has the cache job finished a shard yet?)")
    return Cache(url=url, fingerprint=fp, store=store, manifest=samples, shards=shard_table)
