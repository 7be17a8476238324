"""The cache on storage: shard tars, and the manifest that commits them, a Delta Lake table.

    <output>/teacher.json          fingerprint (written before any shard)
    <output>/config.yaml           resolved config of the latest run
    <output>/shards/<name>.tar     WebDataset samples; <name> is the sha256 of the tar's bytes
    <output>/manifest/             Delta table, one row per committed sample -- THE COMMIT
    <output>/errors/               Delta table, one row per skipped input (key, source, reason, run)
    <output>/runs/<id>/            config.yaml and summary.json of every run

Committing a shard: its tar is written first, under a name derived from its content, then all its
rows are appended to the manifest in one Delta transaction. Delta's optimistic concurrency (an
atomic create-if-absent of the next log entry: a hard link locally, a conditional PUT on object
stores) makes the append atomic and safe with any number of concurrent writers, jobs or Ray tasks,
with no lock service. A tar that no committed row names is an orphan (a writer that died between
its tar and its commit): it is deleted only once older than a retention period, so no clean-up can
remove a tar that a live writer is about to commit, and because names are content hashes, writing
a tar again (a retried task, a racing job) rewrites the same bytes.

Readers see a table version: every row committed up to it. A key committed twice (two writers
racing on the same input) is read once and reported.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.storage import Storage

log = logging.getLogger(__name__)

MANIFEST, ERRORS = "manifest", "errors"
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
    return out


def _commit_properties():
    from deltalake import CommitProperties

    return CommitProperties(max_commit_retries=_MAX_COMMIT_RETRIES)


def create_tables(store: Storage, output: str) -> None:
    """Create the manifest and errors tables if absent (the job's driver, before any writer runs;
    two drivers racing to create them are both fine)."""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError

    for table, schema in ((MANIFEST, SAMPLE_SCHEMA), (ERRORS, ERROR_SCHEMA)):
        url = table_url(output, table)
        if DeltaTable.is_deltatable(url, storage_options=delta_options(store, url)):
            continue
        try:
            DeltaTable.create(url, schema=schema, mode="ignore", storage_options=delta_options(store, url))
        except DeltaError:  # another driver created it first
            if not DeltaTable.is_deltatable(url, storage_options=delta_options(store, url)):
                raise


def _append(store: Storage, output: str, table: str, rows: pa.Table) -> None:
    from deltalake import write_deltalake

    url = table_url(output, table)
    write_deltalake(url, rows, mode="append", storage_options=delta_options(store, url),
                    commit_properties=_commit_properties())


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
    """Write the tar (atomically: a temp file renamed locally, one upload on object stores)."""
    if storage.is_local(url):
        path = storage.local_path(url)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".tar")
        with os.fdopen(fd, "wb") as raw:
            n, sha = _tar_into(raw, samples)
        os.replace(tmp, path)
        return n, sha
    with store.open(url, "wb") as raw:  # an object appears only when its upload completes
        return _tar_into(raw, samples)


def commit_shard(store: Storage, output: str, samples: list[dict], rows: list[dict], run: str) -> dict:
    """Write one shard's tar, then commit it: one Delta append of all its rows. `samples` are tar
    member dicts, `rows` their manifest rows (without the shard fields). Returns the shard's fields."""
    nbytes, sha = _tar_into(None, samples)  # a hashing pass names the tar by its content
    name = sha[:32]
    written, check = _write_tar(store, shard_url(output, name), samples)
    if (written, check) != (nbytes, sha):
        raise RuntimeError(f"shard {name}: tar bytes changed between passes")
    committed = time.time()
    shard = {"shard": name, "tar": f"shards/{name}.tar", "shard_samples": len(rows), "shard_bytes": nbytes,
             "shard_sha256": sha, "run": run, "committed": committed}
    _append(store, output, MANIFEST, pa.Table.from_pylist([dict(r, **shard) for r in rows], schema=SAMPLE_SCHEMA))
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
    if version is None and not DeltaTable.is_deltatable(url, storage_options=opts):
        return None
    return DeltaTable(url, version=version, storage_options=opts)


def read_manifest(store: Storage, output: str, version: int | None = None) -> tuple[pa.Table, int, pa.Table]:
    """(samples, table version, duplicates) of the manifest at `version` (default: the latest).

    A key committed more than once is kept once, from its earliest commit; `duplicates` lists every
    row of such keys (key, shard, run, committed), so they are reported rather than hidden.
    """
    dt = open_table(store, output, MANIFEST, version)
    if dt is None:
        return SAMPLE_SCHEMA.empty_table(), -1, SAMPLE_SCHEMA.empty_table().select(["key", "shard", "run", "committed"])
    rows = dt.to_pyarrow_table().cast(SAMPLE_SCHEMA)
    rows = rows.sort_by([("committed", "ascending"), ("shard", "ascending"), ("key", "ascending")])
    keys = rows.column("key")
    first = _first_occurrence(keys)
    samples = rows.filter(first)
    dup_keys = pc.unique(rows.filter(pc.invert(first)).column("key"))
    duplicates = rows.filter(pc.is_in(keys, value_set=dup_keys)).select(["key", "shard", "run", "committed"])
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
    for row in dt.to_pyarrow_table().sort_by("recorded").to_pylist():
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
                dt.optimize.compact(target_size=target_size, commit_properties=_commit_properties())
            dt.create_checkpoint()
        except DeltaError as e:
            log.warning("could not compact / checkpoint %s: %s", table_url(output, table), e)


def clean_orphans(store: Storage, output: str, retention_s: float) -> list[str]:
    """Delete the shard tars that no committed row names and that are older than `retention_s`
    (longer than any writer's time from its tar to its commit); returns their URLs.

    Every committed row counts, the duplicates of a key included: a shard whose keys all came second
    in a race is still what a snapshot from before the first commit reads."""
    dt = open_table(store, output, MANIFEST)
    named = set(dt.to_pyarrow_table(columns=["tar"]).column("tar").to_pylist()) if dt is not None else set()
    now, removed = time.time(), []
    for url in store.list_files(storage.join(output, "shards")):
        rel = f"shards/{url.rsplit('/', 1)[1]}"
        if rel in named:
            continue
        if now - store.modified(url) > retention_s:
            store.remove(url)
            removed.append(url)
    if removed:
        log.info("removed %d orphan tars older than %.0f s", len(removed), retention_s)
    return removed


def write_json(store: Storage, url: str, obj: dict) -> None:
    store.write_text(url, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(store: Storage, url: str) -> dict:
    return json.loads(store.read_text(url))

