"""Images that need no network: the built-in samples (``builtin:samples`` as a cache source, and
``builtin://...`` URIs anywhere an image URI is taken), and reading any image URI's bytes.

The samples are a photo shipped with matplotlib (``builtin://photo/grace_hopper.jpg``) and a few
procedurally generated scenes (``builtin://synthetic/<i>``), rendered on the fly.
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from pipeline.storage import Storage

BUILTIN = "builtin:samples"
PHOTO = "builtin://photo/grace_hopper.jpg"
_SYNTHETIC = [(480, 640), (768, 1024), (1200, 800), (600, 1500), (512, 512)]  # (h, w)


def read_bytes(uri: str, store: Storage) -> bytes:
    """Bytes of an image URI: a built-in sample, or a file read through `store`."""
    if uri.startswith("builtin://"):
        return _builtin_bytes(uri)
    return store.read_bytes(uri)


def builtin_uris() -> list[str]:
    """URIs of the built-in sample images."""
    uris = [f"builtin://synthetic/{i}" for i in range(len(_SYNTHETIC))]
    if _matplotlib_photo() is not None:
        uris.insert(0, PHOTO)
    return uris


def _matplotlib_photo() -> str | None:
    try:
        import matplotlib
    except ImportError:
        return None
    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    return path if os.path.isfile(path) else None


def _builtin_bytes(uri: str) -> bytes:
    if uri == PHOTO:
        photo = _matplotlib_photo()
        if photo is None:
            raise FileNotFoundError(f"{uri}: matplotlib's sample photo is not installed")
        with open(photo, "rb") as f:
            return f.read()
    try:
        index = int(uri.rsplit("/", 1)[1])
        size = _SYNTHETIC[index]
    except (ValueError, IndexError):
        raise FileNotFoundError(f"{uri} is not a built-in sample; known: {builtin_uris()}") from None
    buf = io.BytesIO()
    Image.fromarray(synthetic_scene(*size, seed=index)).save(buf, format="PNG")
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
