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
"""
from __future__ import annotations

import hashlib
import io
import logging
import re
import tarfile
import urllib.parse
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Iterator

import numpy as np
from PIL import Image

from pipeline import storage

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
BUILTIN = "builtin:samples"
_BUILTIN_SYNTHETIC = [(480, 640), (768, 1024), (1200, 800), (600, 1500), (512, 512)]  # (h, w)


@dataclass(frozen=True)
class SourceItem:
    """One source image: where it is and its stable key. `member` is set for images inside tars."""

    key: str
    uri: str
    tar: str | None = None
    member: str | None = None


def make_key(uri: str) -> str:
    """Stable, unique, dot-free key of a URI: ``<readable stem>_<12 hex of sha1(uri)>``. The URI's
    query string and user info are left out: a re-signed URL names the same image."""
    uri = storage.public_url(uri)
    stem = PurePosixPath(urllib.parse.urlparse(uri).path or uri).name.split(".")[0]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", stem)[:48].strip("-") or "img"
    return f"{stem}_{hashlib.sha1(uri.encode()).hexdigest()[:12]}"


def _expand_braces(pattern: str) -> list[str]:
    import braceexpand  # a webdataset dependency

    return list(braceexpand.braceexpand(pattern))


def source_kind(source: str) -> str:
    """``builtin`` | ``list`` | ``tars`` | ``images`` for a source string."""
    if source == BUILTIN:
        return "builtin"
    low = source.lower()
    if low.endswith((".txt", ".parquet")):
        return "list"
    if low.endswith(".tar") or ("{" in source and ".tar" in low):
        return "tars"
    files = storage.list_files(source, suffixes=(".tar",) + IMAGE_EXTENSIONS)
    has_tars = any(f.lower().endswith(".tar") for f in files)
    has_images = any(not f.lower().endswith(".tar") for f in files)
    if has_tars and not has_images:
        return "tars"
    return "images"


def list_source(source: str) -> list[SourceItem]:
    """All items of a source, sorted by URI (tars are listed member by member)."""
    kind = source_kind(source)
    if kind == "builtin":
        uris = builtin_uris()
    elif kind == "list":
        uris = _read_list(source)
    elif kind == "tars":
        return [item for tar in list_tars(source) for item, _ in iter_tar_images(tar)]  # streams every tar
    else:
        if not storage.exists(source):
            raise FileNotFoundError(f"source {source!r} does not exist")
        uris = storage.list_files(source, suffixes=IMAGE_EXTENSIONS)
    items = [SourceItem(make_key(u), u) for u in sorted(set(uris))]
    _check_unique(items)
    return items


def list_tars(source: str) -> list[str]:
    """The tar URLs of a tar source."""
    if "{" in source:
        return _expand_braces(source)
    if source.lower().endswith(".tar"):
        return [source]
    return storage.list_files(source, suffixes=(".tar",))


def _read_list(source: str) -> list[str]:
    if source.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        with storage.open_file(source, "rb") as f:
            table = pq.read_table(f)
        column = next((c for c in ("uri", "url", "path") if c in table.column_names), None)
        if column is None:
            raise ValueError(f"{source}: a parquet list needs a 'uri', 'url' or 'path' column, has {table.column_names}")
        entries = [str(v) for v in table.column(column).to_pylist() if v]
    else:
        entries = [ln.strip() for ln in storage.read_text(source).splitlines()]
        entries = [e for e in entries if e and not e.startswith("#")]
    base = source.rsplit("/", 1)[0]
    return [e if "://" in e or e.startswith("/") else storage.join(base, e) for e in entries]


def _check_unique(items: list[SourceItem]) -> None:
    seen: dict[str, str] = {}
    for it in items:
        if seen.setdefault(it.key, it.uri) != it.uri:
            raise ValueError(f"key collision: {it.uri} and {seen[it.key]} share key {it.key}")


def iter_tar_images(tar_url: str) -> Iterator[tuple[SourceItem, bytes]]:
    """(item, bytes) for each image member of one tar, streaming it once, one member at a time."""
    with storage.open_file(tar_url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tf:
        for m in tf:
            if m.isfile() and m.name.lower().endswith(IMAGE_EXTENSIONS):
                uri = f"{tar_url}#{m.name}"
                yield SourceItem(make_key(uri), uri, tar=tar_url, member=m.name), tf.extractfile(m).read()


def read_bytes(uri: str) -> bytes:
    """Bytes of an image URI (builtin samples are rendered on the fly)."""
    if uri.startswith("builtin://"):
        return _builtin_bytes(uri)
    return storage.read_bytes(uri)


# -- builtin samples ----------------------------------------------------------------------------

def builtin_uris() -> list[str]:
    """URIs of the built-in sample images."""
    uris = [f"builtin://synthetic/{i}" for i in range(len(_BUILTIN_SYNTHETIC))]
    if _matplotlib_photo() is not None:
        uris.insert(0, "builtin://photo/grace_hopper.jpg")
    return uris


def _matplotlib_photo() -> str | None:
    try:
        import matplotlib
    except ImportError:
        return None
    import os

    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    return path if os.path.isfile(path) else None


def _builtin_bytes(uri: str) -> bytes:
    if uri == "builtin://photo/grace_hopper.jpg":
        with open(_matplotlib_photo(), "rb") as f:
            return f.read()
    index = int(uri.rsplit("/", 1)[1])
    buf = io.BytesIO()
    Image.fromarray(synthetic_scene(*_BUILTIN_SYNTHETIC[index], seed=index)).save(buf, format="PNG")
    return buf.getvalue()


def synthetic_scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic RGB scene: a sky/ground gradient with textured discs and boxes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    horizon = height * rng.uniform(0.4, 0.7)
    sky = np.stack([90 + 60 * yy / height, 140 + 50 * yy / height, 230 - 30 * yy / height], -1)
    ground = np.stack([80 + 40 * np.sin(xx / 37.0), 120 + 30 * np.cos(yy / 23.0), 60 + 0 * xx], -1)
    img = np.where((yy < horizon)[..., None], sky, ground)
    for _ in range(int(rng.integers(4, 9))):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = rng.uniform(0.05, 0.2) * min(height, width)
        colour = rng.uniform(0, 255, size=3)
        if rng.random() < 0.5:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        else:
            mask = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < 1.6 * r)
        texture = 25 * np.sin((xx + yy) / rng.uniform(3, 12))[..., None]
        img = np.where(mask[..., None], colour + texture, img)
    return np.clip(img, 0, 255).astype(np.uint8)
