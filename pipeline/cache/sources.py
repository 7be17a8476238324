"""Image sources: list what to cache and read its bytes (decoding is `pipeline.codecs.decode_image`).

A source is one string:

* ``builtin:samples``            a few images that need no network (a photo shipped with
                                 matplotlib, plus procedurally generated scenes);
* a local folder or fsspec prefix (``/data/sa1b``, ``s3://bucket/images/``), searched recursively
  for image extensions;
* a ``.txt`` list (one path or URL per line; relative entries are relative to the list) or a
  ``.parquet`` list (column ``uri``, ``url`` or ``path``);
* WebDataset tars of images: a ``.tar`` file, a brace pattern (``s3://b/sa1b-{000..099}.tar``), or
  a folder / prefix holding ``.tar`` files (as SA-1B is often stored).

Every item gets a stable key derived from its URI alone (readable stem + hash), so reruns and
extensions of a source find the same keys. Keys contain no dots (WebDataset splits on them).

A tar read to its end leaves an index of its image members (name, data offset, size) in the cache
(`write_tar_index`): a rerun or an extension reads the members it still needs with ranged reads,
skips a tar whose images are all committed without a request to it, and plans ``limit=`` from the
index instead of reading the tar.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import tarfile
import urllib.parse
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.samples import BUILTIN, builtin_uris
from pipeline.storage import Storage

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


@dataclass(frozen=True)
class SourceItem:
    """One source image: where it is and its stable key. `member` is set for images inside tars."""

    key: str
    uri: str
    tar: str | None = None
    member: str | None = None


# parses to itself and its path ends in a name: /local/path, or scheme://host/path (lower-case scheme,
# no user info, query, fragment or parameters, no second URL inside)
_PLAIN_URI = re.compile(r"(?!.*://.*://)(/(?!/)(?!.*://)|[a-z][a-z0-9+.-]*://[^/@?#;:]+/)[^?#;]*[^/?#;]")
_NOT_KEY = re.compile(r"[^A-Za-z0-9_-]+")


def make_key(uri: str) -> str:
    """Stable, unique, dot-free key of a URI: ``<readable stem>_<12 hex of sha1(uri)>``. The URI's
    query string and user info are left out: a re-signed URL names the same image."""
    if _PLAIN_URI.fullmatch(uri):  # the common case, without URL parsing: the same key (tested)
        name = uri.rsplit("/", 1)[1]
        if name not in (".", ".."):
            return _key(name, uri)
    uri = storage.public_url(uri)
    return _key(PurePosixPath(urllib.parse.urlparse(uri).path or uri).name, uri)


def _key(name: str, uri: str) -> str:
    stem = _NOT_KEY.sub("-", name.split(".")[0])[:48].strip("-") or "img"
    return f"{stem}_{hashlib.sha1(uri.encode()).hexdigest()[:12]}"


def natural_key(text: str) -> tuple:
    """Sort key that orders digit runs by value: ``sa_2.jpg`` < ``sa_10.jpg``, ``sa_000009.tar`` <
    ``sa_000010.tar`` (the order people mean by "the first N images")."""
    return tuple((0, int(part), part) if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text))


def _expand_braces(pattern: str) -> list[str]:
    import braceexpand  # a webdataset dependency

    return list(braceexpand.braceexpand(pattern))


def source_kind(source: str, store: Storage) -> str:
    """``builtin`` | ``list`` | ``tars`` | ``images`` for a source string. A folder is ``images`` if
    it holds an image file (the listing stops at the first one), else ``tars`` if it holds tars."""
    if source == BUILTIN:
        return "builtin"
    low = source.lower()
    if low.endswith((".txt", ".parquet")):
        return "list"
    if low.endswith(".tar") or ("{" in source and ".tar" in low):
        return "tars"
    has_tars = False
    for page in store.iter_files(source, suffixes=(".tar",) + IMAGE_EXTENSIONS):
        if any(not f.lower().endswith(".tar") for f in page):
            return "images"
        has_tars = has_tars or bool(page)
    return "tars" if has_tars else "images"


def natural_bytes(text: str) -> bytes:
    """`natural_key` as bytes that sort the same way, so millions of names sort as one arrow array:
    a text part ends in a NUL; a digit run is its value's length and its value, then a byte that
    puts a run with leading zeros (followed by the run itself and a NUL) between ``0`` and every
    other run of its value, as the tuples' comparison of the runs does (``0 < 00``, ``01 < 1``)."""
    parts = re.split(r"(\d+)", text)
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            value = str(int(part))
            tie = (b"\x00" if value == "0" else b"\x02") if value == part else b"\x01" + part.encode() + b"\0"
            out.append(len(value).to_bytes(2, "big") + value.encode() + tie)
        else:
            out.append(part.encode() + b"\0")
    return b"".join(out)


@dataclass(frozen=True)
class SourceList:
    """A source's images in natural order: image i is ``root + names[i]``. One arrow array of names
    relative to the listed folder: ~20 bytes an SA-1B image, no Python object per image."""

    root: str
    names: pa.Array

    def __len__(self) -> int:
        return len(self.names)

    def uris(self, lo: int = 0, hi: int | None = None) -> list[str]:
        return [self.root + n for n in self.names[lo:hi].to_pylist()]

    def head(self, n: int | None) -> "SourceList":
        return self if n is None else SourceList(self.root, self.names[:n])


LIST_CHUNK = 1 << 16  # names encoded, keyed or checked at a time


def list_images(source: str, store: Storage, kind: str | None = None, check: bool = True) -> SourceList:
    """The images of a non-tar source (`source_kind` ``builtin``, ``list`` or ``images``), unique,
    in natural URI order, with their keys checked for collisions (`check_unique`, unless `check` is
    false: the caller does). A folder is listed page by page (`Storage.iter_files`) and kept as
    names below it; each page is reduced to arrow as it comes."""
    kind = kind or source_kind(source, store)
    if kind == "builtin":
        root, pages = "", [builtin_uris()]
    elif kind == "list":
        root, pages = "", [_read_list(source, store)]
    elif kind == "images":
        if not store.exists(source):
            raise FileNotFoundError(f"source {source!r} does not exist")
        fs, path = store.filesystem(source)
        root = "" if store.call("stat", source, lambda: fs.isfile(path)) else _listing_root(source, store)
        pages = store.iter_files(source, suffixes=IMAGE_EXTENSIONS)
    else:
        raise ValueError(f"{source} is a tar source: its images are listed by its tars")
    names, order = [], []
    for page in pages:
        if any(not u.startswith(root) for u in page):
            raise ValueError(f"listing {source} gave {page[0]!r}, not under {root!r}")
        page = [u[len(root):] for u in page]
        names.append(pa.array(page, pa.string()))
        order.append(pa.array([natural_bytes(u) for u in page], pa.binary()))
    names = pa.concat_arrays(names) if names else pa.array([], pa.string())
    order = pc.sort_indices(pa.chunked_array(order, pa.binary()))  # merges the pages' sorts: no copy of them
    names = names.take(order)
    del order
    if len(names) > 1:
        names = names.filter(pa.concat_arrays([pa.array([True]), pc.not_equal(names[1:], names[:-1])]))
    listed = SourceList(root, names)
    if check:
        check_unique(listed)
    return listed


def _listing_root(source: str, store: Storage) -> str:
    """What `Storage.list_files` puts before a file's path below the folder `source`."""
    _, path = store.filesystem(source)
    proto = storage.protocol(source)
    return (path if proto == "file" else f"{proto}://{path}").rstrip("/") + "/"


def list_source(source: str, store: Storage) -> list[SourceItem]:
    """All items of a source in natural URI order (tars in natural order, then member by member in tar
    order), so ``limit=N`` takes the first N as a person counts them. One Python object an item:
    for small sources and tests; the cache job uses `list_images` (and `plan_tar_limit`)."""
    kind = source_kind(source, store)
    if kind == "tars":
        return [item for tar in list_tars(source, store) for item, _ in iter_tar_images(tar, store)]  # streams every tar
    return [SourceItem(make_key(u), u) for u in list_images(source, store, kind).uris()]


def list_tars(source: str, store: Storage) -> list[str]:
    """The tar URLs of a tar source, in natural order (a brace pattern keeps its own order)."""
    if "{" in source:
        return _expand_braces(source)
    if source.lower().endswith(".tar"):
        return [source]
    return sorted(store.list_files(source, suffixes=(".tar",)), key=natural_key)


def _read_list(source: str, store: Storage) -> list[str]:
    if source.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        with store.open(source, "rb") as f:
            table = pq.read_table(f)
        column = next((c for c in ("uri", "url", "path") if c in table.column_names), None)
        if column is None:
            raise ValueError(f"{source}: a parquet list needs a 'uri', 'url' or 'path' column, has {table.column_names}")
        entries = [str(v) for v in table.column(column).to_pylist() if v]
    else:
        entries = [ln.strip() for ln in store.read_text(source).splitlines()]
        entries = [e for e in entries if e and not e.startswith("#")]
    base = source.rsplit("/", 1)[0]
    return [e if "://" in e or e.startswith("/") else storage.join(base, e) for e in entries]


def check_unique(listed: SourceList, hashes: np.ndarray | None = None) -> None:
    """Refuse two URIs with one key (a 48-bit hash collision between images of the same stem). By
    a 64-bit hash of every key (`hashes`, in `listed`'s order, if the caller has them), sorted and
    compared with its neighbour's; only equal hashes are looked at key by key."""
    from pipeline.cache.shards import key_hashes

    if hashes is None:
        hashes = np.concatenate([np.zeros(0, np.uint64)] + [
            key_hashes(pa.array([make_key(u) for u in listed.uris(lo, lo + LIST_CHUNK)], pa.string()))
            for lo in range(0, len(listed), LIST_CHUNK)])
    hashes = np.sort(hashes)
    if not (hashes[1:] == hashes[:-1]).any():
        return
    seen: dict[str, str] = {}
    for uri in listed.uris():
        if seen.setdefault(make_key(uri), uri) != uri:
            raise ValueError(f"key collision: {uri} and {seen[make_key(uri)]} share key {make_key(uri)}")


@dataclass(frozen=True)
class TarMember:
    """An image member of a source tar: its name and where its bytes are."""

    name: str
    offset: int  # of its data in the tar
    size: int


def tar_item(tar_url: str, name: str) -> SourceItem:
    uri = f"{tar_url}#{name}"
    return SourceItem(make_key(uri), uri, tar=tar_url, member=name)


def iter_tar_images(tar_url: str, store: Storage, members: set[str] | None = None,
                    index: list[TarMember] | None = None) -> Iterator[tuple[SourceItem, bytes]]:
    """(item, bytes) for each image member of one tar (only `members`, if given), streaming it once,
    one member at a time. `index`, if given, receives every image member's `TarMember` as it passes
    (complete only once the tar is read to its end)."""
    with store.open(tar_url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tf:
        for m in tf:
            if m.isfile() and m.name.lower().endswith(IMAGE_EXTENSIONS):
                if index is not None:
                    index.append(TarMember(m.name, m.offset_data, m.size))
                if members is None or m.name in members:
                    yield tar_item(tar_url, m.name), tf.extractfile(m).read()


READ_GAP = 1 << 20  # members closer than this are read in one request (the bytes between are discarded)
READ_SPAN = 64 << 20  # ... unless that request would span more than this (a task holds one request's bytes)


def read_tar_members(tar_url: str, store: Storage, wanted: list[TarMember]) -> Iterator[tuple[SourceItem, bytes]]:
    """(item, bytes) of the `wanted` members of a tar (from its index), in tar order, by ranged reads:
    one request per run of members less than `READ_GAP` apart and within `READ_SPAN` (a larger member
    is one request of its own); the rest of the tar is not read."""
    wanted = sorted(wanted, key=lambda m: m.offset)
    i = 0
    while i < len(wanted):
        j = i + 1
        while (j < len(wanted) and wanted[j].offset - (wanted[j - 1].offset + wanted[j - 1].size) < READ_GAP
               and wanted[j].offset + wanted[j].size - wanted[i].offset <= READ_SPAN):
            j += 1
        start, end = wanted[i].offset, wanted[j - 1].offset + wanted[j - 1].size
        data = store.read_range(tar_url, start, end)
        if len(data) != end - start:
            raise EOFError(f"{storage.public_url(tar_url)}: {len(data)} of the {end - start} bytes at {start} read")
        for m in wanted[i:j]:
            yield tar_item(tar_url, m.name), data[m.offset - start:m.offset - start + m.size]
        i = j


def tar_index_url(output: str, tar_url: str) -> str:
    """Where a cache keeps a source tar's index of image members."""
    return storage.join(output, "sources", f"{make_key(tar_url)}.json")


def write_tar_index(store: Storage, output: str, tar_url: str, members: list[TarMember]) -> None:
    """Record a tar's image members (all of them: written once the tar was read to its end)."""
    store.write_text(tar_index_url(output, tar_url), json.dumps({
        "tar": storage.public_url(tar_url), "names": [m.name for m in members],
        "offsets": [m.offset for m in members], "sizes": [m.size for m in members]}))


def read_tar_index(store: Storage, output: str, tar_url: str) -> list[TarMember] | None:
    """A tar's image members as its index recorded them, or None if it has none (never read to its
    end, or the index is unreadable: the tar is then streamed again)."""
    url = tar_index_url(output, tar_url)
    try:
        index = json.loads(store.read_text(url))
        return [TarMember(str(n), int(o), int(s)) for n, o, s in
                zip(index["names"], index["offsets"], index["sizes"], strict=True)]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        log.warning("ignoring the unreadable tar index %s: %s", url, e)
        return None


def list_tar_images(tar_url: str, store: Storage, limit: int, index: list[TarMember] | None = None) -> list[str]:
    """Names of the first `limit` image members of a tar, in tar order, from one sequential read of
    the tar that stops at the last of them: requests in proportion to the bytes read (the storage's
    read-ahead blocks), never one per member. `index` receives every image member passed, as
    `iter_tar_images` fills it. A tar that breaks off (truncated, corrupt) keeps the members listed
    before the break (streaming it records the error); a storage fault that outlasts the retries
    raises (`pipeline.retry.StorageError`), so a listing never depends on which requests failed."""
    names: list[str] = []
    try:
        with store.open(tar_url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tf:
            for m in tf:
                if m.isfile() and m.name.lower().endswith(IMAGE_EXTENSIONS):
                    if len(names) >= limit:
                        return names  # one past the last: the tar was not read to its end
                    names.append(m.name)
                    if index is not None:
                        index.append(TarMember(m.name, m.offset_data, m.size))
    except (tarfile.TarError, OSError, EOFError) as e:
        if getattr(e, "transient", False):  # a storage fault past the retries: the next tar must not fill
            raise  # the limit in its place, or `limit=` would not be the first N (a rerun lists it again)
        log.warning("listing %s stopped after %d images: %s", storage.public_url(tar_url), len(names), e)
        if index is not None:
            index.clear()  # incomplete: no index is written
    return names


PLAN_TARS_AT_ONCE = 4  # tars `plan_tar_limit` reads in parallel


def plan_tar_limit(tars: list[str], store: Storage, limit: int, output: str | None = None
                   ) -> list[tuple[str, list[str]]]:
    """The first `limit` images of a tar source as (tar, member names): tars in the given (natural)
    order, members in tar order. Tars the cache at `output` has an index of cost one small read;
    the others are read once each, only up to what the limit can still need, as many at a time
    (at most `PLAN_TARS_AT_ONCE`) as the images per tar seen so far say are needed; a tar read to its
    end leaves its index (its images are then read by range)."""
    from concurrent.futures import ThreadPoolExecutor

    def listed(tar: str, left: int) -> list[str]:
        index = read_tar_index(store, output, tar) if output is not None else None
        if index is not None:
            return [m.name for m in index[:left]]
        seen: list[TarMember] = []
        names = list_tar_images(tar, store, left, seen)
        if output is not None and seen and len(seen) == len(names) and len(names) < left:  # read to its end
            try:
                write_tar_index(store, output, tar, seen)
            except OSError as e:
                log.warning("could not record the index of %s: %s", storage.public_url(tar), e)
        return names

    plan, left, start, per_tar = [], limit, 0, 0
    with ThreadPoolExecutor(PLAN_TARS_AT_ONCE) as pool:
        while left > 0 and start < len(tars):
            # as many tars at once as the limit still needs, by the images of the tars read so far
            wave = tars[start:start + (min(PLAN_TARS_AT_ONCE, -(-left // per_tar)) if per_tar else 1)]
            for tar, names in zip(wave, pool.map(lambda t: listed(t, left), wave)):
                names = names[:left]
                if names:
                    plan.append((tar, names))
                    left -= len(names)
            start += len(wave)
            per_tar = max(1, (limit - left) // start)
    return plan
