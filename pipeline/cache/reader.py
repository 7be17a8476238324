"""A teacher cache as an asset: its fingerprint, its manifest, and its decoded samples.

    cache = pipeline.open_cache("s3://bucket/caches/sa1b-maskclip-s24")
    cache.fingerprint["backbone"], len(cache), cache.version, cache.samples  # key, shard, height, width
    for sample in cache:           # key, image (H, W, 3) uint8, target (h, w, D) float32, meta
        ...
    pinned = pipeline.open_cache(url, version=cache.version)   # the same samples, whatever was added since

Opening reads what training needs of every sample (`Cache.samples`: key, shard and image size,
~45 bytes a sample kept, ~95 at the peak of opening); the manifest's other columns are read when
asked for (`Cache.manifest`).
Only committed samples are read (the manifest's rows at one Delta table version), and every member
is checked against its checksum. Every name a cache gives (sample keys, shard names, tar paths and
member names) is checked against the grammar the cache job writes when the manifest is opened and
when a tar is read: readers turn keys and member names into paths, and a cache is data that anyone
with write access to its prefix controls.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import string
import tarfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

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


class UnsafeName(CacheError, ValueError):
    """A key, shard or tar member name in a cache that breaks the grammar the cache job writes."""


# The names a cache's contents give, which readers turn into paths (a held-out sample's folder and
# its member files, a shard's URL): sample keys are `sources.make_key`'s ``<stem>_<12 hex>`` plus
# ``_v<view>``, shards the first 32 hex digits of their tar's sha256. Letters, digits, '_' and '-'
# only: no separator and no dot (WebDataset splits member names at the first one), so no name can be
# absolute, '..', hidden or empty, and none can break the CSV of `record_keys`.
NAME_CHARS = string.ascii_letters + string.digits + "_-"
MAX_NAME = 128
_NAME = f"[A-Za-z0-9_-]{{1,{MAX_NAME}}}"
_MEMBER = re.compile(rf"{_NAME}(?:\.[A-Za-z0-9_-]+)+")  # <key>.<ext>, ext as "json" or "target.npy"
_GRAMMAR = f"1 to {MAX_NAME} letters, digits, '_' or '-'"


def is_safe_name(name: object) -> bool:
    """Whether `name` is a key or shard name the cache job can have written."""
    return isinstance(name, str) and re.fullmatch(_NAME, name) is not None


def check_names(names: pa.Array | pa.ChunkedArray, what: str, url: str) -> None:
    """Refuse (`UnsafeName`, naming the first offender and `url`) any of `names` that is not a safe
    name. Vectorised, with no per-name Python work: a manifest holds millions of keys."""
    if len(names) == 0:
        return
    lengths = pc.min_max(pc.binary_length(names)).as_py()
    rest = pc.max(pc.binary_length(pc.ascii_ltrim(names, characters=NAME_CHARS))).as_py()  # what is not NAME_CHARS
    if names.null_count == 0 and rest == 0 and 1 <= lengths["min"] and lengths["max"] <= MAX_NAME:
        return
    bad = next(n for n in names.to_pylist() if not is_safe_name(n))  # slow path: the cache is refused anyway
    raise UnsafeName(f"{url}: {what} {bad!r} is not a name the cache job writes ({_GRAMMAR}); refusing the "
                     "cache, whose contents could otherwise name paths outside their directories")


def distinct(column: pa.ChunkedArray) -> pa.Array:
    """The distinct values of a column, dictionary-encoded or not (nulls included, as one null)."""
    if not pa.types.is_dictionary(column.type):
        return pc.unique(column)
    values = pc.unique(pa.concat_arrays([c.dictionary for c in column.chunks])) if column.num_chunks else \
        pa.array([], column.type.value_type)
    return pa.concat_arrays([values, pa.nulls(1, values.type)]) if column.null_count else values


def check_manifest(url: str, manifest: pa.Table) -> None:
    """Refuse a manifest whose keys, shard names or tar paths (if it has them) break the cache job's grammar."""
    check_names(manifest.column("key"), "sample key", url)
    check_names(distinct(manifest.column("shard")), "shard name", url)
    if "tar" not in manifest.column_names:
        return
    tars = distinct(manifest.column("tar"))
    below = pc.coalesce(pc.and_(pc.starts_with(tars, "shards/"), pc.ends_with(tars, ".tar")), False)  # not fill_null: it imports pandas
    if not pc.all(below, min_count=0).as_py():  # an empty manifest has no tar to refuse (all() of none: null)
        bad = tars.filter(pc.invert(below))[0].as_py()
        raise UnsafeName(f"{url}: shard path {bad!r} is not shards/<name>.tar; refusing the cache")
    check_names(pc.utf8_slice_codeunits(tars, len("shards/"), -len(".tar")), "shard path's name", url)


def check_member(name: str, url: str) -> None:
    """Refuse a tar member whose name is not ``<key>.<ext>`` in the cache job's grammar."""
    if _MEMBER.fullmatch(name) is None:
        raise UnsafeName(f"{url}: tar member {name!r} is not <key>.<extension> with a key of {_GRAMMAR} and "
                         "dot-separated extensions of the same characters; refusing the shard, whose contents "
                         "could otherwise name paths outside their directories")


def fingerprint_digest(fp: dict) -> str:
    """sha256 over the identity fields (everything but version and timestamps)."""
    ident = {k: v for k, v in fp.items() if k not in _VOLATILE}
    return "sha256:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def fingerprint_diff(a: dict, b: dict) -> list[str]:
    """Identity fields that differ between two fingerprints, as readable lines."""
    keys = sorted((set(a) | set(b)) - set(_VOLATILE))
    return [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


# What a cache records of how its images were drawn and stored, not of what its teacher computes:
# caches that differ only in these hold targets of one teacher (a run may train on them together)
_NOT_TEACHER = ("format", "augmentation", "image_format")


def teacher_identity(fp: dict) -> dict:
    """The fields of a fingerprint that say what a target is: backbone, weights (their digest, not
    where they were read from), patch, window, stride, normalization, compute dtype, encoding."""
    ident = {k: v for k, v in fp.items() if k not in _VOLATILE + _NOT_TEACHER}
    ident["weights"] = {k: v for k, v in (fp.get("weights") or {}).items() if k != "uri"}
    return ident


def teacher_diff(a: dict, b: dict) -> list[str]:
    """The teacher fields (`teacher_identity`) that differ between two fingerprints, as readable lines."""
    return fingerprint_diff(teacher_identity(a), teacher_identity(b))


TAR_STREAM_BUFSIZE = 1 << 20  # tarfile's stream mode reads in 10 kB pieces by default: ~1 GB/s at most


def _tar_members(stream, url: str, alloc: Callable[[int], Any] = bytearray,
                 keep: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """``{fname, data}`` of every regular member, in tar order. A seekable stream (local files, s3fs
    and other fsspec files) is read member by member into a fresh writable buffer ``alloc(size)``
    (a ``bytearray`` by default) -- one copy from the file, and arrays decode in place; other
    streams go through tarfile's stream reader. Members of samples whose key `keep` refuses are
    left out: unread on a seekable stream, and never copied into a buffer. Every regular member's
    name is checked (`check_member`) before it is kept or skipped, so a tar that breaks the grammar
    is refused whichever of its samples a reader wants."""
    from webdataset.tariterators import base_plus_ext

    seekable = getattr(stream, "seekable", lambda: False)()
    with tarfile.open(fileobj=stream, mode="r:" if seekable else "r|", bufsize=TAR_STREAM_BUFSIZE) as tar:
        for m in tar:
            if not m.isfile():
                continue
            check_member(m.name, url)
            if keep is not None and not keep(base_plus_ext(m.name)[0]):
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
    read with the job's options; members are grouped into samples by webdataset's key rules. A
    member whose name breaks the cache job's grammar raises `UnsafeName`."""
    from webdataset.tariterators import group_by_keys

    with store.open(url, "rb") as stream:
        yield from group_by_keys(dict(m, __url__=url) for m in _tar_members(stream, url, alloc, keep))


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
    samples: pa.Table = field(repr=False)  # one row per sample: key, shard (dictionary-encoded), height, width
    duplicates: pa.Table = field(repr=False)  # rows of keys committed more than once (racing writers): key, shard, run, committed
    _errors: pa.Table | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.samples.num_rows

    @functools.cached_property
    def manifest(self) -> pa.Table:
        """Every column of the manifest, one row per sample: key, source, view, shard, tar, sizes,
        grid, checksums, windows, run (read on first use: ~400 bytes a sample)."""
        rows, _, _ = shards.read_manifest(self.store, self.url, self.version)
        check_manifest(self.url, rows)
        return rows

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
        return self.samples.column("key").to_pylist()

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
    `Storage`; default: the filesystem's standard credentials. A manifest that names a key, shard or
    tar outside the cache job's grammar is refused (`UnsafeName`).
    """
    store = storage_options if isinstance(storage_options, Storage) else Storage(dict(storage_options or {}))
    url = storage.resolve(url)
    fp = read_fingerprint(url, store)
    check_format(url, fp)
    # every row group is checked as it is read; duplicates repeat these keys, their other shards are never read
    samples, found, duplicates = shards.read_samples(store, url, version, check=lambda rows: check_manifest(url, rows))
    if require_samples and samples.num_rows == 0:
        raise CacheError(f"{url} holds no committed samples (has the cache job finished a shard yet?)")
    return Cache(url=url, fingerprint=fp, store=store, version=found, samples=samples, duplicates=duplicates)
