"""Shard sink and manifest: the cache's on-storage layout and its commit protocol.

    <output>/teacher.json                      fingerprint (written before any shard)
    <output>/config.yaml                       resolved config of the latest run
    <output>/shards/<name>.tar                 WebDataset samples
    <output>/manifest/samples/<name>.parquet   one row per sample of that shard
    <output>/manifest/shards/<name>.parquet    one row for the shard -- THE COMMIT
    <output>/errors/<name>.parquet             inputs skipped (key, source, reason)

Commit protocol: a shard is written tar first, then its sample rows, then its shard row. Only a
shard whose shard row exists is committed; readers see nothing else, and the next run deletes
whatever a crashed run left without a commit. Shard names hash the keys they hold, so a writer
that Ray runs twice for the same batch rewrites nothing (it finds the commit and stops).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from pipeline import storage
from pipeline.storage import Storage

log = logging.getLogger(__name__)

SAMPLE_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("view", pa.int32()), ("shard", pa.string()),
    ("height", pa.int32()), ("width", pa.int32()), ("grid_h", pa.int32()), ("grid_w", pa.int32()),
    ("target_bytes", pa.int64()), ("target_checksum", pa.string()), ("windows", pa.int64()),
])
SHARD_SCHEMA = pa.schema([
    ("shard", pa.string()), ("samples", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string()),
    ("created", pa.float64()),
])
ERROR_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("reason", pa.string())])


def shard_url(output: str, name: str) -> str:
    return storage.join(output, "shards", f"{name}.tar")


def samples_url(output: str, name: str) -> str:
    return storage.join(output, "manifest", "samples", f"{name}.parquet")


def commit_url(output: str, name: str) -> str:
    return storage.join(output, "manifest", "shards", f"{name}.parquet")


def shard_name(keys: Iterable[str]) -> str:
    """Deterministic shard name from the keys it holds."""
    return "shard-" + hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:20]


def _write_table(store: Storage, url: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.write_bytes(url, buf.getvalue())


def _read_table(store: Storage, url: str) -> pa.Table:
    with store.open(url, "rb") as f:
        return pq.read_table(f)


class _HashingWriter(io.RawIOBase):
    """File wrapper that counts and sha256-hashes what goes through it."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.n += len(b)
        return self.f.write(b)


def _write_tar(store: Storage, url: str, samples: list[dict], mtime: float) -> tuple[int, str]:
    """Write WebDataset samples to one tar; returns (bytes, sha256). Local tars go via a temp file."""
    if storage.is_local(url):
        path = storage.local_path(url)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".tar")
        with os.fdopen(fd, "wb") as raw:
            n, sha = _tar_into(raw, samples, mtime)
        os.replace(tmp, path)
        return n, sha
    with store.open(url, "wb") as raw:  # an object appears only when its upload completes
        return _tar_into(raw, samples, mtime)


def _tar_into(raw, samples: list[dict], mtime: float) -> tuple[int, str]:
    hw = _HashingWriter(raw)
    with wds.TarWriter(hw, mtime=mtime) as sink:
        for s in samples:
            sink.write(s)
    return hw.n, hw.sha.hexdigest()


def is_committed(store: Storage, output: str, name: str) -> bool:
    return store.exists(commit_url(output, name))


def commit_shard(store: Storage, output: str, samples: list[dict], rows: list[dict]) -> dict:
    """Write one shard and commit it. `samples` are tar member dicts, `rows` their manifest rows.

    Returns the shard row. If the shard is already committed (a retried task), writes nothing.
    """
    name = shard_name(r["key"] for r in rows)
    if is_committed(store, output, name):
        log.info("shard %s already committed; skipping the rewrite", name)
        return {"shard": name, "samples": len(rows), "bytes": 0, "sha256": "", "created": 0.0, "skipped": True}
    created = time.time()
    nbytes, sha = _write_tar(store, shard_url(output, name), samples, mtime=created)
    for r in rows:
        r["shard"] = name
    sample_table = pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
    _write_table(store, samples_url(output, name), sample_table)
    shard_row = {"shard": name, "samples": len(rows), "bytes": nbytes, "sha256": sha, "created": created}
    _write_table(store, commit_url(output, name), pa.Table.from_pylist([shard_row], schema=SHARD_SCHEMA))
    # A writer of a killed run can outlive its driver for a moment, and the next run's clean-up may
    # have removed this shard's files between the writes above. Put them back (the tar byte for
    # byte: same members, same mtime), so a commit always has its tar and its rows.
    if not store.exists(shard_url(output, name)):
        log.warning("shard %s: tar removed before its commit landed; rewriting it", name)
        _write_tar(store, shard_url(output, name), samples, mtime=created)
    if not store.exists(samples_url(output, name)):
        log.warning("shard %s: sample rows removed before the commit landed; rewriting them", name)
        _write_table(store, samples_url(output, name), sample_table)
    return dict(shard_row, skipped=False)


def write_errors(store: Storage, output: str, errors: list[dict]) -> None:
    """Record skipped inputs (one parquet per writer batch)."""
    if errors:
        name = shard_name(e["key"] for e in errors)
        _write_table(store, storage.join(output, "errors", f"{name}.parquet"),
                     pa.Table.from_pylist(errors, schema=ERROR_SCHEMA))


def committed_shards(store: Storage, output: str) -> list[str]:
    """Names of committed shards."""
    urls = store.list_files(storage.join(output, "manifest", "shards"), suffixes=(".parquet",))
    return sorted(u.rsplit("/", 1)[1][: -len(".parquet")] for u in urls)


def read_manifest(store: Storage, output: str) -> tuple[pa.Table, pa.Table]:
    """(samples, shards) tables of the committed shards; a key in several shards is kept once
    (first shard by name), so a retried batch can never duplicate samples for readers."""
    names = committed_shards(store, output)
    if not names:
        return SAMPLE_SCHEMA.empty_table(), SHARD_SCHEMA.empty_table()
    shards = pa.concat_tables([_read_table(store, commit_url(output, n)) for n in names])
    samples = pa.concat_tables([_read_table(store, samples_url(output, n)) for n in names])
    keys = samples.column("key").to_pylist()
    if len(set(keys)) != len(keys):
        seen, keep = set(), []
        for i, k in enumerate(keys):
            keep.append(k not in seen)
            seen.add(k)
        log.warning("manifest: %d duplicate keys across shards; keeping the first", len(keys) - len(seen))
        samples = samples.filter(pa.array(keep))
    return samples, shards


def read_errors(store: Storage, output: str) -> pa.Table:
    """Inputs skipped by the latest run."""
    urls = store.list_files(storage.join(output, "errors"), suffixes=(".parquet",))
    if not urls:
        return ERROR_SCHEMA.empty_table()
    return pa.concat_tables([_read_table(store, u) for u in urls])


def clean_uncommitted(store: Storage, output: str) -> int:
    """Delete tars and sample rows that have no commit (left by a crashed run). Returns the count.

    Call only while no other job writes to `output`.
    """
    committed = set(committed_shards(store, output))
    removed = 0
    for url in store.list_files(storage.join(output, "shards")):
        stem = url.rsplit("/", 1)[1].split(".")[0]
        if stem not in committed:
            store.remove(url)
            removed += 1
    for url in store.list_files(storage.join(output, "manifest", "samples")):
        if url.rsplit("/", 1)[1][: -len(".parquet")] not in committed:
            store.remove(url)
            removed += 1
    if removed:
        log.info("removed %d uncommitted objects left by an earlier run", removed)
    return removed


def reset_errors(store: Storage, output: str) -> None:
    """Forget the previous run's errors: every uncommitted input is retried and re-recorded."""
    store.remove(storage.join(output, "errors"), recursive=True)


def write_json(store: Storage, url: str, obj: dict) -> None:
    store.write_text(url, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(store: Storage, url: str) -> dict:
    return json.loads(store.read_text(url))
