"""The cache on storage: shard tars, and the manifest that commits them, a Delta Lake table.

    <output>/teacher.json          fingerprint (written before any shard)
    <output>/config.yaml           resolved config of the latest run
    <output>/shards/<name>.tar     WebDataset samples; <name> is the sha256 of the tar's bytes
    <output>/manifest/             Delta table, one row per committed sample -- THE COMMIT
    <output>/errors/               Delta table, one row per skipped input (key, source, reason, run)
    <output>/runs/<id>/            config.yaml and summary.json of every run
    <output>/sources/<key>.json    the image members of each source tar read to its end (name, offset, size)
    <output>/writers/<run>.json    the lease of each running cache job (`WriterLease`), removed at its end

Committing shards: each tar is written first, under a name derived from its content (`write_shard`),
then the rows of one or several written shards are appended to the manifest in one Delta
transaction (`commit`; the cache job's driver commits its writers' shards in groups). Delta's optimistic concurrency (an
atomic create-if-absent of the next log entry: a hard link locally, a conditional PUT on object
stores) makes the append atomic and safe with any number of concurrent writers, jobs or Ray tasks,
with no lock service. A tar that no committed row names is an orphan (a writer that died between
its tar and its commit): it is deleted only once older than a retention period and older than the
start of every live writer's lease, so no clean-up can remove a tar that a live writer may still
commit, however long its tar waits for its commit. Because names are content hashes, writing a tar
again (a retried task, a racing job) rewrites the same bytes.

Readers see a table version: every row committed up to it. A key committed twice (two writers
racing on the same input) is read once and reported.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import threading
import time
import uuid

from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import retry, storage
from pipeline.storage import Storage, public_url

log = logging.getLogger(__name__)

MANIFEST, ERRORS, WRITERS = "manifest", "errors", "writers"
LEASE_EVERY_S, LEASE_TTL_S = 60.0, 900.0  # a writer's heartbeat; a lease not renewed for this long is a dead writer's
LEASE_MARGIN_S = 2.0  # object stores date objects to the second: a tar from a lease's first second is the lease's
SAMPLE_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("view", pa.int32()), ("shard", pa.string()),
    ("tar", pa.string()),  # path of the shard's tar below the cache root
    ("height", pa.int32()), ("width", pa.int32()), ("grid_h", pa.int32()), ("grid_w", pa.int32()),
    ("target_bytes", pa.int64()), ("image_checksum", pa.string()), ("target_checksum", pa.string()),
    ("windows", pa.int64()), ("shard_samples", pa.int64()), ("shard_bytes", pa.int64()),
    ("shard_sha256", pa.string()), ("run", pa.string()), ("committed", pa.float64()),
])
ERROR_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("reason", pa.string()),
                          ("run", pa.string()), ("recorded", pa.float64())])
SHARD_COLUMNS = {"shard_samples": "samples", "shard_bytes": "bytes", "shard_sha256": "sha256"}
MAX_KEY_BYTES = 128  # the longest key the cache job writes
_MAX_COMMIT_RETRIES = 1000  # concurrent appends never conflict; each retry only re-reads the log tail
_ALLOW_HTTP = ("http://", "HTTP://")


def shard_url(output: str, name: str) -> str:
    return storage.join(output, "shards", f"{name}.tar")


def table_url(output: str, table: str = MANIFEST) -> str:
    """The Delta table's location as delta-rs takes it (local paths absolute)."""
    url = storage.join(output, table)
    return storage.resolve(storage.local_path(url)) if storage.is_local(url) else url


def delta_options(store: Storage, url: str) -> dict[str, str]:
    """`store`'s fsspec options for `url`, in delta-rs's (object_store's) names. Without options,
    delta-rs reads the standard ``AWS_*`` environment and credential chain itself."""
    opts = store.options_for(url)
    if storage.protocol(url) not in ("s3", "s3a"):
        return {str(k): str(v) for k, v in opts.items()}
    out: dict[str, str] = {}
    names = {"key": "AWS_ACCESS_KEY_ID", "secret": "AWS_SECRET_ACCESS_KEY", "token": "AWS_SESSION_TOKEN",
             "endpoint_url": "AWS_ENDPOINT_URL", "region_name": "AWS_REGION"}
    flat = {**opts.get("client_kwargs", {}), **{k: v for k, v in opts.items() if k != "client_kwargs"}}
    for key, value in flat.items():
        if key in names and value is not None:
            out[names[key]] = str(value)
    if out.get("AWS_ENDPOINT_URL", os.environ.get("AWS_ENDPOINT_URL", "")).startswith(_ALLOW_HTTP):
        out["AWS_ALLOW_HTTP"] = "true"
    if "AWS_ENDPOINT_URL" in out and "AWS_REGION" not in out and not os.environ.get("AWS_REGION"):
        out["AWS_REGION"] = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")  # signing needs one; servers ignore it
    return {**out, **_delta_retry(store)}


def _delta_retry(store: Storage) -> dict[str, str]:
    """The storage's retry policy in object_store's names: its own retries of a request (a body cut
    mid-stream is resumed with a range read) within the policy's deadline and backoff cap; what
    still fails is retried by the storage layer around the whole operation."""
    p = store.policy
    return {"retry_timeout": f"{max(1, round(p.deadline_s))}s", "backoff_config.max_backoff": f"{int(p.max_backoff_s * 1000)}ms",
            "backoff_config.init_backoff": f"{int(p.initial_s * 1000)}ms"}


def _commit_properties(app_transactions=None):
    from deltalake import CommitProperties

    return CommitProperties(max_commit_retries=_MAX_COMMIT_RETRIES, app_transactions=app_transactions)


_WRITER = {"id": None, "next": 0}  # this process's Delta app id and its next transaction version
_WRITER_LOCK = threading.Lock()


def _next_transaction():
    """A Delta app transaction (app id, version) unique to this append: one app id per process (a
    checkpoint keeps one entry per app id, so not one per commit), versions counting up."""
    from deltalake import Transaction

    with _WRITER_LOCK:
        if _WRITER["id"] is None or _WRITER.get("pid") != os.getpid():
            _WRITER.update(id=f"spar-{uuid.uuid4().hex}", next=0, pid=os.getpid())
        _WRITER["next"] += 1
        return Transaction(app_id=_WRITER["id"], version=_WRITER["next"])


def create_tables(store: Storage, output: str) -> None:
    """Create the manifest and errors tables if absent (the job's driver, before any writer runs;
    two drivers racing to create them are both fine)."""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError

    for table, schema in ((MANIFEST, SAMPLE_SCHEMA), (ERRORS, ERROR_SCHEMA)):
        url = table_url(output, table)
        opts = delta_options(store, url)

        def create() -> None:
            if DeltaTable.is_deltatable(url, storage_options=opts):
                return
            try:
                DeltaTable.create(url, schema=schema, mode="ignore", storage_options=opts)
            except DeltaError:  # another driver created it first
                if not DeltaTable.is_deltatable(url, storage_options=opts):
                    raise

        store.call("manifest", url, create)


def _append(store: Storage, output: str, table: str, rows: pa.Table) -> None:
    """One Delta append of `rows`, unambiguous under faults. The log entry is a conditional PUT: when
    its answer is lost after the store applied it, delta-rs either raises (a reset) or retries, finds
    the version taken, and would commit the same rows again. So the append carries an app
    transaction of its own: delta-rs's retry then fails as a conflict with itself, and whenever a
    try's outcome is unknown the log is read (`transaction_version`) before anything is appended
    again."""
    from deltalake import DeltaTable, write_deltalake
    from deltalake.exceptions import CommitFailedError

    url = table_url(output, table)
    opts = delta_options(store, url)
    txn = _next_transaction()

    def landed() -> bool:
        return (DeltaTable(url, storage_options=opts).transaction_version(txn.app_id) or 0) >= txn.version

    def append() -> None:
        try:
            write_deltalake(url, rows, mode="append", storage_options=opts,
                            commit_properties=_commit_properties([txn]))
        except Exception as e:
            ours = isinstance(e, CommitFailedError) and "Concurrent transaction" in str(e)
            if not ours and retry.classify(e) is None:
                raise  # permanent: nothing was appended
            if store.call("manifest", url, landed):
                log.info("%s: an append whose answer was lost is in the log (transaction %s/%d): not repeated",
                         public_url(url), txn.app_id, txn.version)
                return
            raise

    store.call("commit", url, append)


class _HashingWriter(io.RawIOBase):
    """File wrapper that counts and sha256-hashes what goes through it (`f=None`: hash only)."""

    def __init__(self, f=None):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.n += len(b)
        return self.f.write(b) if self.f is not None else len(b)


def _tar_into(raw, samples: list[dict]) -> tuple[int, str]:
    import webdataset as wds  # here, not above: webdataset imports torch, which a cache's readers never need

    hw = _HashingWriter(raw)
    with wds.TarWriter(hw, mtime=0.0) as sink:  # fixed mtime: the bytes are a function of the samples
        for s in samples:  # webdataset re-encodes anything that is not bytes by its extension
            sink.write({k: bytes(v) if isinstance(v, (bytearray, memoryview)) else v for k, v in s.items()})
    return hw.n, hw.sha.hexdigest()


def _write_tar(store: Storage, url: str, samples: list[dict]) -> tuple[int, str]:
    """Write the tar, never half-visible: a temp file renamed locally; on object stores an upload
    aborted if it fails (and written again under the retry policy), its size checked once done."""
    return store.write_stream(url, lambda raw: _tar_into(raw, samples))


def write_shard(store: Storage, output: str, samples: list[dict], rows: list[dict], run: str) -> pa.Table:
    """Write one shard's tar, named by its content, and return its manifest rows (`rows` with the
    shard's fields): what `commit` makes part of the cache. `samples` are tar member dicts."""
    nbytes, sha = _tar_into(None, samples)  # a hashing pass names the tar by its content
    name = sha[:32]
    written, check = _write_tar(store, shard_url(output, name), samples)
    if (written, check) != (nbytes, sha):
        raise RuntimeError(f"shard {name}: tar bytes changed between passes")
    shard = {"shard": name, "tar": f"shards/{name}.tar", "shard_samples": len(rows), "shard_bytes": nbytes,
             "shard_sha256": sha, "run": run, "committed": time.time()}
    return pa.Table.from_pylist([dict(r, **shard) for r in rows], schema=SAMPLE_SCHEMA)


def commit(store: Storage, output: str, written: list[pa.Table]) -> None:
    """Commit shards `write_shard` wrote: one Delta append of all their rows, so the shards become
    part of the cache together or not at all (their ``committed`` time is this commit's)."""
    rows = pa.concat_tables(written)
    _append(store, output, MANIFEST, rows.set_column(rows.schema.get_field_index("committed"), "committed",
                                                     pa.repeat(pa.scalar(time.time(), pa.float64()), rows.num_rows)))


def commit_shard(store: Storage, output: str, samples: list[dict], rows: list[dict], run: str) -> dict:
    """Write one shard's tar, then commit it alone (`write_shard`, `commit`). Returns its fields."""
    written = write_shard(store, output, samples, rows, run)
    commit(store, output, [written])
    name, nbytes, sha = (written.column(c)[0].as_py() for c in ("shard", "shard_bytes", "shard_sha256"))
    return {"shard": name, "samples": len(rows), "bytes": nbytes, "sha256": sha}


def write_errors(store: Storage, output: str, errors: list[dict], run: str) -> None:
    """Record skipped inputs (one append per writer batch)."""
    if errors:
        now = time.time()
        _append(store, output, ERRORS, pa.Table.from_pylist([dict(e, run=run, recorded=now) for e in errors],
                                                            schema=ERROR_SCHEMA))


def open_table(store: Storage, output: str, table: str = MANIFEST, version: int | None = None):
    """The Delta table (at `version`, default the latest), or None if the cache has none yet."""
    from deltalake import DeltaTable

    url = table_url(output, table)
    opts = delta_options(store, url)

    def load():
        if version is None and not DeltaTable.is_deltatable(url, storage_options=opts):
            return None
        return DeltaTable(url, version=version, storage_options=opts)

    return store.call("manifest", url, load)


SAMPLE_COLUMNS = ["key", "shard", "height", "width"]  # what training and validation read of every sample
_DICTIONARY = pa.dictionary(pa.int32(), pa.string())
_HASH_PRIME = np.uint64(0x100000001B3)


def _powers(n: int) -> np.ndarray:
    """_HASH_PRIME ** i (mod 2**64) for i < n."""
    return np.cumprod(np.append(np.uint64(1), np.full(max(n, 1) - 1, _HASH_PRIME, np.uint64)), dtype=np.uint64)


def key_hashes(keys: pa.Array, chunk: int = 1 << 13) -> np.ndarray:
    """A 64-bit polynomial hash of every string of `keys` (no nulls), computed on the array's bytes
    `chunk` strings at a time: no Python object per key. Equal strings hash equal; a collision of
    different ones is possible, so equal hashes are only candidates."""
    out = np.zeros(len(keys), np.uint64)
    powers = _powers(MAX_KEY_BYTES)
    for lo in range(0, len(keys), chunk):
        part = keys.slice(lo, chunk)
        offsets = np.frombuffer(part.buffers()[1], np.int32)[part.offset:part.offset + len(part) + 1].astype(np.int64)
        data = np.frombuffer(part.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
        lengths = np.diff(offsets)
        if lengths.max(initial=0) > len(powers):
            powers = _powers(int(lengths.max()))
        starts = offsets[:-1] - offsets[0]
        where = np.arange(len(data), dtype=np.int64) - np.repeat(starts, lengths)
        sums = np.add.reduceat(data.astype(np.uint64) * powers[where], starts[lengths > 0]) if len(data) else []
        out[lo:lo + len(part)][lengths > 0] = sums
        out[lo:lo + len(part)] ^= lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return out


_DIGEST = np.dtype([("high", ">u8"), ("low", ">u8")])  # 128 bits of blake2b: sorts and compares as one number


def key_digests(keys: list[str], chunk: int = 1 << 16) -> np.ndarray:
    """A 128-bit blake2b digest of every key (`_DIGEST`), computed `chunk` at a time."""
    out = np.empty(len(keys), _DIGEST)
    for lo in range(0, len(keys), chunk):
        joined = b"".join([hashlib.blake2b(k.encode(), digest_size=16).digest() for k in keys[lo:lo + chunk]])
        out[lo:lo + chunk] = np.frombuffer(joined, _DIGEST)
    return out


class KeySet:
    """A set of sample keys as sorted 128-bit digests: 16 bytes a key, no Python object per key, and
    passed to Ray tasks as one array (read from the object store without a copy). Two different keys
    share a digest with probability ~2**-128 per pair."""

    def __init__(self, digests: np.ndarray):
        self.digests = np.sort(digests.astype(_DIGEST, copy=False))  # numpy may have made its fields native-endian

    @classmethod
    def from_bytes(cls, data: bytes) -> "KeySet":
        """The set whose `digests.tobytes()` gave `data` (what a Ray task is sent)."""
        return cls(np.frombuffer(data, _DIGEST))

    @classmethod
    def of(cls, keys: pa.Array | pa.ChunkedArray, chunk: int = 1 << 16) -> "KeySet":
        parts = [key_digests(keys.slice(lo, chunk).to_pylist()) for lo in range(0, len(keys), chunk)]
        return cls(np.concatenate(parts) if parts else np.empty(0, _DIGEST))

    def __len__(self) -> int:
        return len(self.digests)

    def contains(self, keys: list[str]) -> np.ndarray:
        """Whether each of `keys` is in the set (bool per key)."""
        if not len(self.digests):
            return np.zeros(len(keys), bool)
        wanted = key_digests(keys)
        found = np.minimum(np.searchsorted(self.digests, wanted), len(self.digests) - 1)
        return self.digests[found] == wanted

    def __contains__(self, key: str) -> bool:
        return bool(self.contains([key])[0])


class Committed:
    """What a rerun of the cache job skips, as of the manifest's `version`: the committed keys of
    samples of image sources (`keys`), and those of tar members grouped by their tar, so that each
    tar's task is given its own keys only (`in_tar`). 16 bytes a committed key."""

    def __init__(self, version: int, digests: np.ndarray, codes: np.ndarray, tars: list[str]):
        self.version, self._tars = version, {t: i for i, t in enumerate(tars)}
        self.keys = KeySet(digests[codes < 0])
        in_tars = codes >= 0
        digests, codes = digests[in_tars], codes[in_tars]
        order = np.lexsort((digests["low"], digests["high"], codes))
        self._by_tar = digests[order]
        self._bounds = np.searchsorted(codes[order], np.arange(len(tars) + 1))

    def __len__(self) -> int:
        return len(self.keys) + len(self._by_tar)

    def in_tar(self, tar_url: str) -> KeySet:
        """The committed keys whose source is a member of the tar at `tar_url`."""
        code = self._tars.get(storage.public_url(tar_url))
        if code is None:
            return KeySet(np.empty(0, _DIGEST))
        return KeySet(self._by_tar[self._bounds[code]:self._bounds[code + 1]])


_TAR_OF_SOURCE = r"(?i)^(?P<tar>.*?\.tar)#"  # sources.tar_item's URI: <tar URL>#<member name>


def committed_keys(store: Storage, output: str) -> Committed:
    """The keys committed in the manifest's latest version, read row group by row group (key and
    source columns only): what a rerun of the cache job skips."""
    tars: dict[str, int] = {}
    codes, digests = [np.empty(0, np.int32)], [np.empty(0, _DIGEST)]
    dt = open_table(store, output, MANIFEST)
    for part in _row_groups(store, dt, ["key", "source"]):
        digests.append(key_digests(part.column("key").to_pylist()))
        tar = pc.struct_field(pc.extract_regex(part.column("source"), _TAR_OF_SOURCE), [0])
        encoded = pc.dictionary_encode(tar).combine_chunks()
        local = np.array([tars.setdefault(t, len(tars)) for t in encoded.dictionary.to_pylist()] + [-1], np.int32)
        codes.append(local[pc.coalesce(encoded.indices, pa.scalar(-1, pa.int32())).to_numpy()])
    return Committed(dt.version() if dt is not None else -1, np.concatenate(digests), np.concatenate(codes), list(tars))


def _row_groups(store: Storage, dt, columns: list[str], dictionary: tuple[str, ...] = ()) -> Iterator[pa.Table]:
    """`columns` of every row group of the Delta table `dt`'s files (none if `dt` is None), read one
    row group at a time through `store`; the `dictionary` columns dictionary-encoded."""
    import pyarrow.parquet as pq

    for uri in dt.file_uris() if dt is not None else ():
        with store.open(uri, "rb") as f:
            pf = pq.ParquetFile(f, read_dictionary=list(dictionary), pre_buffer=False)
            for group in range(pf.num_row_groups):
                yield pf.read_row_group(group, columns=columns, use_threads=False)


def read_samples(store: Storage, output: str, version: int | None = None,
                 check: Callable[[pa.Table], None] | None = None) -> tuple[pa.Table, int, pa.Table]:
    """(samples, table version, duplicates) as `read_manifest` with ``columns=SAMPLE_COLUMNS``, at
    ~100 bytes a sample at its peak (~45 kept): the manifest's parquet files are read through `store` one row group at a
    time, shard names dictionary-encoded, and keys de-duplicated by a hash of their bytes (the exact
    path of `read_manifest` runs only if two rows share a hash). `check` sees every row group with
    its tar paths (dictionary-encoded) before they are dropped."""
    dt = open_table(store, output, MANIFEST, version)
    if dt is None:
        return read_manifest(store, output, version, columns=SAMPLE_COLUMNS)
    schema = pa.schema([("key", pa.string()), ("shard", _DICTIONARY), ("height", pa.int32()), ("width", pa.int32())])
    parts, hashes = [], []
    for part in _row_groups(store, dt, [*SAMPLE_COLUMNS, "tar"], ("shard", "tar")):
        part = part.cast(pa.schema([*schema, ("tar", _DICTIONARY)]))
        if check is not None:
            check(part)
        parts.append(part.select(SAMPLE_COLUMNS))
        hashes.append(key_hashes(part.column("key").combine_chunks()))
        pa.default_memory_pool().release_unused()
    samples = pa.concat_tables(parts) if parts else schema.empty_table()
    del parts
    found = dt.version()
    hashed = np.sort(np.concatenate(hashes)) if hashes else np.zeros(0, np.uint64)
    del hashes
    if len(hashed) and (hashed[1:] == hashed[:-1]).any():  # a key twice, or a collision: the exact path decides
        del samples
        samples, found, duplicates = read_manifest(store, output, found, columns=SAMPLE_COLUMNS)
        return samples.cast(schema), found, duplicates
    return samples, found, SAMPLE_SCHEMA.empty_table().select(["key", "shard", "run", "committed"])


def read_manifest(store: Storage, output: str, version: int | None = None,
                  columns: list[str] | None = None) -> tuple[pa.Table, int, pa.Table]:
    """(samples, table version, duplicates) of the manifest at `version` (default: the latest):
    every column, or only `columns` (read from storage, the others never decoded).

    A key committed more than once is kept once, from its earliest commit; `duplicates` lists every
    row of such keys (key, shard, run, committed), so they are reported rather than hidden.
    """
    schema = SAMPLE_SCHEMA if columns is None else pa.schema([SAMPLE_SCHEMA.field(c) for c in columns])
    dup_columns = ["key", "shard", "run", "committed"]
    dt = open_table(store, output, MANIFEST, version)
    if dt is None:
        return schema.empty_table(), -1, SAMPLE_SCHEMA.empty_table().select(dup_columns)
    read = None if columns is None else list(dict.fromkeys([*columns, "committed"]))
    rows = store.call("manifest", table_url(output), lambda: dt.to_pyarrow_table(columns=read))
    rows = rows.cast(SAMPLE_SCHEMA if columns is None else pa.schema([SAMPLE_SCHEMA.field(c) for c in read]))
    rows = rows.sort_by([("committed", "ascending"), ("shard", "ascending"), ("key", "ascending")])
    keys = rows.column("key")
    first = _first_occurrence(keys)
    if pc.all(first).as_py() is not False:  # no key twice (the usual case): nothing to filter or report
        return rows.select(schema.names), dt.version(), SAMPLE_SCHEMA.empty_table().select(dup_columns)
    samples = rows.filter(first).select(schema.names)
    dup_keys = pc.unique(rows.filter(pc.invert(first)).column("key"))
    duplicates = store.call("manifest", table_url(output), lambda: open_table(
        store, output, MANIFEST, dt.version()).to_pyarrow_table(columns=dup_columns)) if columns is not None else rows
    duplicates = duplicates.filter(pc.is_in(duplicates.column("key"), value_set=dup_keys)).select(dup_columns)
    duplicates = duplicates.cast(SAMPLE_SCHEMA.empty_table().select(dup_columns).schema).sort_by(
        [("committed", "ascending"), ("shard", "ascending"), ("key", "ascending")])
    if duplicates.num_rows:
        log.warning("manifest: %d keys were committed more than once (by racing writers); each is read once",
                    len(dup_keys))
    return samples, dt.version(), duplicates


def _first_occurrence(keys: pa.ChunkedArray) -> pa.Array:
    """True at the first row of every key, in row order (vectorised: one group-by)."""
    index = pa.array(range(len(keys)), pa.int64())
    firsts = pa.table({"key": keys, "i": index}).group_by("key").aggregate([("i", "min")]).column("i_min")
    return pc.is_in(index, value_set=firsts)


def committed_shards(store: Storage, output: str) -> list[str]:
    """Names of the committed shards at the manifest's latest version ([] before the first commit)."""
    samples, _, _ = read_manifest(store, output)
    return sorted(set(samples.column("shard").to_pylist()))


def shard_table(samples: pa.Table) -> pa.Table:
    """One row per committed shard: shard, tar, samples, bytes, sha256 (from the sample rows)."""
    if samples.num_rows == 0:
        return pa.table({"shard": pa.array([], pa.string()), "tar": pa.array([], pa.string()),
                         "samples": pa.array([], pa.int64()), "bytes": pa.array([], pa.int64()),
                         "sha256": pa.array([], pa.string())})
    cols = ["shard", "tar", *SHARD_COLUMNS]
    table = samples.select(cols).group_by(cols).aggregate([]).sort_by("shard")
    return table.rename_columns(["shard", "tar", *SHARD_COLUMNS.values()])


def read_errors(store: Storage, output: str, committed: set[str]) -> pa.Table:
    """Inputs that failed and are not committed since: the latest reason per key."""
    dt = open_table(store, output, ERRORS)
    if dt is None:
        return ERROR_SCHEMA.empty_table().select(["key", "source", "reason"])
    latest: dict[str, dict] = {}
    for row in store.call("manifest", table_url(output, ERRORS), dt.to_pyarrow_table).sort_by("recorded").to_pylist():
        if row["key"] not in committed:
            latest[row["key"]] = row
    table = pa.Table.from_pylist(list(latest.values()), schema=ERROR_SCHEMA)
    return table.select(["key", "source", "reason"])


def finish(store: Storage, output: str, small_files: int = 4, target_size: int = 16 << 20) -> None:
    """What a job does after its last commit so the next open reads a constant number of objects:
    compact the manifest's small files (one per commit) when there are many, then checkpoint the
    log. Best effort: a concurrent writer's commit can make either step retry or fail (logged)."""
    from deltalake.exceptions import DeltaError

    for table in (MANIFEST, ERRORS):
        dt = open_table(store, output, table)
        if dt is None:
            continue
        try:
            if len(dt.file_uris()) > small_files:
                # files reaching target_size are left alone: a long job does not rewrite its history
                store.call("compact", table_url(output, table), lambda: dt.optimize.compact(
                    target_size=target_size, commit_properties=_commit_properties()))
            store.call("checkpoint", table_url(output, table), dt.create_checkpoint)
        except (DeltaError, OSError) as e:
            log.warning("could not compact / checkpoint %s: %s", table_url(output, table), e)


class WriterLease:
    """A running cache job's claim on the tars it has written and not committed yet: the file
    ``<output>/writers/<run>.json``, dated by the store when first written (the lease's start: every
    tar the job writes is newer) and written again every `every_s` seconds by a background thread
    while the job runs (its heartbeat). `clean_orphans` keeps every tar newer than the start of a
    live lease, one renewed within its `ttl_s`; a job that ends removes its lease, and a killed
    one's lease expires `ttl_s` after its last heartbeat (a clean-up then removes it too).

    Use as a context manager around everything the job writes and commits."""

    def __init__(self, store: Storage, output: str, run: str, every_s: float = LEASE_EVERY_S,
                 ttl_s: float = LEASE_TTL_S):
        if not 0 < every_s < ttl_s:
            raise ValueError(f"a lease's heartbeat ({every_s} s) must come well within its ttl ({ttl_s} s)")
        self.store, self.url, self.every_s = store, storage.join(output, WRITERS, f"{run}.json"), every_s
        self.body = {"run": run, "ttl_s": ttl_s, "pid": os.getpid(), "host": platform.node()}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="writer-lease", daemon=True)

    def __enter__(self) -> "WriterLease":
        self.store.write_text(self.url, json.dumps(self.body))
        self.body["started"] = self.store.modified(self.url)  # the store's clock, as the tars' dates
        self.store.write_text(self.url, json.dumps(self.body))
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()
        try:
            self.store.remove(self.url)
        except Exception as e:  # noqa: BLE001  (it expires; the run's own error, if any, is the one to raise)
            log.warning("could not remove the writer lease %s (it expires in %.0f s): %s",
                        public_url(self.url), self.body["ttl_s"], e)

    def _beat(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                self.store.write_text(self.url, json.dumps(self.body))
            except Exception as e:  # noqa: BLE001  (the next beat tries again; the ttl spans several)
                log.warning("writer lease %s not renewed: %s", public_url(self.url), e)


def live_writers(store: Storage, output: str, now: float | None = None, remove_expired: bool = True) -> list[dict]:
    """The leases of the writers running on `output` (`WriterLease`), each with its ``started`` and
    ``renewed`` times; expired leases (a killed job's) are removed unless `remove_expired` is false."""
    now, live = time.time() if now is None else now, []
    for url in store.list_files(storage.join(output, WRITERS), suffixes=(".json",)):
        try:
            renewed, text = store.modified(url), store.read_text(url)
        except FileNotFoundError:  # its job ended meanwhile
            continue
        try:
            lease = json.loads(text)
            lease = dict(lease, run=str(lease["run"]), ttl_s=float(lease["ttl_s"]),
                         started=float(lease.get("started", renewed)))
        except (ValueError, TypeError, KeyError):  # not a lease this code wrote: taken as one begun at its date
            log.warning("%s is not a writer lease; taken as one started and renewed at its date", public_url(url))
            lease = {"run": url.rsplit("/", 1)[1], "ttl_s": LEASE_TTL_S, "started": renewed}
        if now - renewed < lease["ttl_s"]:
            live.append(dict(lease, renewed=renewed))
        elif remove_expired:
            log.info("removing the expired lease of writer %s (renewed %.0f s ago)", lease["run"], now - renewed)
            store.remove(url)
    return live


def clean_orphans(store: Storage, output: str, retention_s: float) -> list[str]:
    """Delete the shard tars that no committed row names, that are older than `retention_s` and
    that no live writer may still commit (written before the start of every live writer's lease:
    `live_writers`); returns their URLs.

    Every committed row counts, the duplicates of a key included: a shard whose keys all came second
    in a race is still what a snapshot from before the first commit reads."""
    now = time.time()
    # Leases first: a writer that starts after this listing writes only tars newer than `now`.
    writers = live_writers(store, output, now)
    before = min([now - retention_s, now - LEASE_MARGIN_S] + [w["started"] - LEASE_MARGIN_S for w in writers])
    dt = open_table(store, output, MANIFEST)
    named = set(store.call("manifest", table_url(output), lambda: dt.to_pyarrow_table(columns=["tar"]))
                .column("tar").to_pylist()) if dt is not None else set()
    removed = []
    for url in store.list_files(storage.join(output, "shards")):
        rel = f"shards/{url.rsplit('/', 1)[1]}"
        if rel in named:
            continue
        try:
            old = store.modified(url) < before
        except FileNotFoundError:  # removed meanwhile (another clean-up)
            continue
        if old:
            store.remove(url)
            removed.append(url)
    if removed:
        log.info("removed %d orphan tars older than %.0f s and than every live writer (%d)",
                 len(removed), retention_s, len(writers))
    return removed


def write_json(store: Storage, url: str, obj: dict) -> None:
    store.write_text(url, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(store: Storage, url: str) -> dict:
    return json.loads(store.read_text(url))

