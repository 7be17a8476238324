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

from pipeline.cache import shards, sources
from pipeline.cache.encode import IMAGE_MEMBER, META_EXT, SCALE_EXT, TARGET_EXT
from pipeline.storage import Storage, public_url

log = logging.getLogger(__name__)


def image_row(row: dict, *, root: str) -> dict:
    """Ray Data map: a (name, view) row of `WorkItems.images` -> the row `augment_row` reads."""
    source = root + row["name"]
    key = sources.make_key(source)
    return {"key": key, "sample_key": f"{key}_v{row['view']}", "source": source, "view": int(row["view"])}


def expand_tar(row: dict, *, views: int, store: Storage, output: str) -> Iterator[dict]:
    """Ray Data flat_map: one tar -> its image members (those of ``row["members"]`` if the driver
    chose them) x views that are not committed yet (``row["done"]``: the digests of the tar's
    committed keys).

    A tar the cache has an index of (`sources.read_tar_index`) is read by ranged reads of the members
    still needed, and not at all when every one is committed. Otherwise it is streamed once, one
    member in memory at a time (Ray Data cuts the output into blocks as it goes), so SA-1B's 10 GB
    tars cost a task about a block of memory, and its index is written once it is read to its end. A
    tar that cannot be read to its end (truncated, corrupt, unreachable) keeps the members read
    before the break and yields one error row naming the tar.
    """
    done_keys = shards.KeySet.from_bytes(row["done"])
    tar = row["tar"]
    members = set(row["members"]) if row.get("members") is not None else None

    def needed(item: sources.SourceItem) -> list[int]:
        keys = [f"{item.key}_v{v}" for v in range(views)]
        return [v for v, committed in enumerate(done_keys.contains(keys)) if not committed]

    index = sources.read_tar_index(store, output, tar)
    seen: list[sources.TarMember] = []
    try:
        if index is not None:
            wanted = [m for m in index if (members is None or m.name in members) and needed(sources.tar_item(tar, m.name))]
            images = sources.read_tar_members(tar, store, wanted)
        else:
            images = sources.iter_tar_images(tar, store, members, seen)
        for item, data in images:
            for v in needed(item):
                yield {"key": item.key, "sample_key": f"{item.key}_v{v}", "source": item.uri, "view": v,
                       "data": data, "error": ""}
    except (tarfile.TarError, OSError, EOFError) as e:
        key = sources.make_key(tar)
        yield {"key": key, "sample_key": f"{key}_tar", "source": tar, "view": 0, "data": b"",
               "error": f"unreadable tar: {type(e).__name__}: {e}"}
        return
    if index is None:  # streamed to its end: the next run reads only what it needs
        try:
            sources.write_tar_index(store, output, tar, seen)
        except OSError as e:
            log.warning("could not record the index of %s (the next run streams it again): %s", public_url(tar), e)


def write_batch(batch: dict[str, np.ndarray], *, output: str, image_ext: str, store: Storage,
                run: str) -> dict[str, np.ndarray]:
    """Ray Data stage: write one shard's tar (and record errors) from a batch of teacher outputs (the
    image member, column ``image_member``, is stored as ``<key>.<image_ext>``); its manifest rows
    go to the driver, which commits them (column ``rows``: Arrow IPC, empty if no sample)."""
    samples, rows, errors = [], [], []
    for i in range(len(batch["sample_key"])):
        key, source = str(batch["sample_key"][i]), str(batch["source"][i])
        if batch["error"][i]:
            errors.append({"key": key, "source": public_url(source), "reason": str(batch["error"][i])})
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
    return {"shard": np.array([written.column("shard")[0].as_py() if written else ""]),
            "samples": np.array([len(samples)]), "errors": np.array([len(errors)]),
            "bytes": np.array([written.column("shard_bytes")[0].as_py() if written else 0]),
            "windows": np.array([int(np.sum(batch["windows"]))]),
            "rows": np.array([_ipc(written) if written else b""], dtype=object)}


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()
