"""The cache job's CPU tasks, as Ray Data runs them: read a source, write a shard.

They import no torch (nor anything that does): a read, augment or write worker process holds only
numpy, Arrow and the storage client, not the ~2 CPU-seconds and ~450 MB (peak RSS) of torch that only the
teacher actors need (`tests/unit/test_layout.py` keeps it so).
"""
from __future__ import annotations

import json
import logging
import tarfile
from typing import Iterator

import numpy as np
import pyarrow as pa

from pipeline import retry
from pipeline.cache import shards, sources
from pipeline.cache.encode import IMAGE_MEMBER, META_EXT, SCALE_EXT, TARGET_EXT
from pipeline.storage import Storage, public_url

TRANSIENT = "transient: "  # the reason's prefix of an input that failed for a storage fault, not for itself


def failure_reason(e: BaseException, what: str) -> str:
    """The recorded reason of an input that could not be read: ``transient: ...`` when a storage
    fault outlasted the retries (the input is not bad; the next run tries it again), else
    ``<what>: ...`` (a reason in the input: missing, denied, corrupt)."""
    transient = getattr(e, "transient", None)
    if transient is None:
        transient = retry.classify(e) is not None
    return f"{TRANSIENT if transient else ''}{what}: {type(e).__name__}: {e}"


def retries_taken() -> str:
    """This process's storage retries since the last call, as JSON (``""`` if none): a column every
    task fills, so the driver can add up the retries of every process."""
    taken = retry.take_counts()
    return json.dumps(taken) if taken else ""

log = logging.getLogger(__name__)


def image_row(row: dict, *, root: str) -> dict:
    """Ray Data map: a (name, view) row of `WorkItems.images` -> the row `augment_row` reads."""
    source = root + row["name"]
    key = sources.make_key(source)
    return {"key": key, "sample_key": f"{key}_v{row['view']}", "source": source, "view": int(row["view"]),
            "lost": 0, "retries": ""}


def expand_tar(row: dict, *, views: int, store: Storage, output: str) -> Iterator[dict]:
    """Ray Data flat_map: one tar -> its image members (those of ``row["members"]`` if the driver
    chose them) x views that are not committed yet (``row["done"]``: the digests of the tar's
    committed keys).

    A tar the cache has an index of (`sources.read_tar_index`) is read by ranged reads of the members
    still needed, and not at all when every one is committed. Otherwise it is streamed once, one
    member in memory at a time (Ray Data cuts the output into blocks as it goes), so SA-1B's 10 GB
    tars cost a task about a block of memory, and its index is written once it is read to its end.
    A stream cut by a storage fault resumes at its byte offset (`Storage.open`). A tar that cannot
    be read to its end (truncated, corrupt, or unreachable past the retries) keeps the members read
    before the break and yields one error row naming the tar, whose ``lost`` counts the samples it
    did not yield: exactly when the members are known (an index, the driver's choice), else
    estimated from the bytes left and the members' mean size so far (at least 1).
    """
    done_keys = shards.KeySet.from_bytes(row["done"])
    tar = row["tar"]
    members = set(row["members"]) if row.get("members") is not None else None

    def needed(item: sources.SourceItem) -> list[int]:
        keys = [f"{item.key}_v{v}" for v in range(views)]
        return [v for v, committed in enumerate(done_keys.contains(keys)) if not committed]

    seen: list[sources.TarMember] = []
    wanted, yielded = None, 0
    try:
        index = sources.read_tar_index(store, output, tar)
        if index is not None:
            wanted = [m for m in index if (members is None or m.name in members) and needed(sources.tar_item(tar, m.name))]
            images = sources.read_tar_members(tar, store, wanted)
        else:
            images = sources.iter_tar_images(tar, store, members, seen)
        for item, data in images:
            for v in needed(item):
                yield {"key": item.key, "sample_key": f"{item.key}_v{v}", "source": item.uri, "view": v,
                       "data": data, "error": "", "lost": 0, "retries": retries_taken()}
            yielded += 1
    except (tarfile.TarError, OSError, EOFError) as e:
        key = sources.make_key(tar)
        if wanted is not None or members is not None:
            lost = (len(wanted) if wanted is not None else len(members)) - yielded
        else:
            lost = len(seen) - yielded + _estimate_left(store, tar, seen)  # listed but not read, and beyond
        yield {"key": key, "sample_key": f"{key}_tar", "source": tar, "view": 0, "data": b"",
               "error": failure_reason(e, "unreadable tar"), "lost": max(1, lost) * views,
               "retries": retries_taken()}
        return
    if index is None:  # streamed to its end: the next run reads only what it needs
        try:
            sources.write_tar_index(store, output, tar, seen)
        except OSError as e:
            log.warning("could not record the index of %s (the next run streams it again): %s", public_url(tar), e)


def _estimate_left(store: Storage, tar: str, seen: list[sources.TarMember]) -> int:
    """About how many images of a tar lie past the members `seen` (bytes left / mean bytes a member
    so far; 1 when nothing can tell)."""
    if not seen:
        return 1
    try:
        size = store.size(tar)
    except OSError:
        return 1
    end = seen[-1].offset + seen[-1].size
    return max(0, round((size - 1024 - end) / (end / len(seen))))  # a tar ends in two 512-byte blocks


def write_batch(batch: dict[str, np.ndarray], *, output: str, image_ext: str, store: Storage,
                run: str) -> dict[str, np.ndarray]:
    """Ray Data stage: write one shard's tar (and record errors) from a batch of teacher outputs (the
    image member, column ``image_member``, is stored as ``<key>.<image_ext>``); its manifest rows
    go to the driver, which commits them (column ``rows``: Arrow IPC, empty if no sample)."""
    samples, rows, errors, failed, transient = [], [], [], 0, 0
    retries = retry.merge({}, retry.take_counts())
    for i in range(len(batch["sample_key"])):
        key, source = str(batch["sample_key"][i]), str(batch["source"][i])
        retry.merge(retries, json.loads(batch["retries"][i]) if batch["retries"][i] else None)
        if batch["error"][i]:
            reason = str(batch["error"][i])
            errors.append({"key": key, "source": public_url(source), "reason": reason})
            lost = max(1, int(batch["lost"][i]))  # a whole tar's error row stands for every sample it lost
            failed += lost
            transient += lost if reason.startswith(TRANSIENT) else 0
            continue
        members = {"__key__": key, image_ext: batch[IMAGE_MEMBER][i], TARGET_EXT: batch[TARGET_EXT][i],
                   META_EXT: batch[META_EXT][i]}
        if len(batch[SCALE_EXT][i]):
            members[SCALE_EXT] = batch[SCALE_EXT][i]
        meta = json.loads(members[META_EXT])
        samples.append(members)
        rows.append({"key": key, "source": public_url(source), "view": int(batch["view"][i]),
                     "height": meta["image_size"][0], "width": meta["image_size"][1], "grid_h": meta["grid"][0],
                     "grid_w": meta["grid"][1], "target_bytes": len(members[TARGET_EXT]),
                     "image_checksum": meta["image_checksum"], "target_checksum": meta["target_checksum"],
                     "windows": meta["windows"]})
    shards.write_errors(store, output, errors, run)
    written = shards.write_shard(store, output, samples, rows, run) if samples else None
    retry.merge(retries, retry.take_counts())
    return {"shard": np.array([written.column("shard")[0].as_py() if written else ""]),
            "samples": np.array([len(samples)]), "errors": np.array([failed]),
            "transient": np.array([transient]), "retries": np.array([json.dumps(retries)], dtype=object),
            "bytes": np.array([written.column("shard_bytes")[0].as_py() if written else 0]),
            "windows": np.array([int(np.sum(batch["windows"]))]),
            "rows": np.array([_ipc(written) if written else b""], dtype=object)}


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()
