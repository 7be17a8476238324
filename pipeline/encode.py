"""Sample encoding: targets as ``.npy`` (float16 / float32 / int8 + per-token scales), images as
lossless PNG, metadata as JSON -- and the reverse, with checksum verification.

A cached sample is one WebDataset group of tar members sharing a key::

    <key>.png               the augmented image, exactly the pixels the teacher saw
    <key>.target.npy        (h, w, D) in the cache's encoding
    <key>.target_scale.npy  (h, w, 1) float32 per-token scales (int8 only)
    <key>.json              metadata (source, augmentation, sizes, encoding, checksums)

Nothing here pickles: ``.npy`` members are written and read with ``allow_pickle=False``.
"""
from __future__ import annotations

import io
import json
import zlib

import numpy as np
import torch
from PIL import Image

ENCODINGS = ("float16", "float32", "int8")
IMAGE_EXT, TARGET_EXT, SCALE_EXT, META_EXT = "png", "target.npy", "target_scale.npy", "json"


class CorruptSample(ValueError):
    """A cached sample whose bytes do not match its recorded checksum or layout."""


def checksum(data: bytes) -> str:
    """Fast integrity checksum of a member (crc32; shards carry a sha256 as well)."""
    return f"crc32:{zlib.crc32(data):08x}"


def quantize(target: torch.Tensor, encoding: str) -> dict[str, torch.Tensor]:
    """Encode an ``(h, w, D)`` float map on its device: ``{"target": ..., ["target_scale": ...]}``.

    int8 uses symmetric per-token absmax scales: ``x ~= q * scale`` with ``scale = max|x| / 127``.
    """
    if encoding == "float32":
        return {"target": target.float()}
    if encoding == "float16":
        return {"target": target.half()}
    if encoding == "int8":
        scale = target.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0
        q = torch.round(target.float() / scale).clamp_(-127, 127).to(torch.int8)
        return {"target": q, "target_scale": scale}
    raise ValueError(f"unknown encoding {encoding!r}; use one of {ENCODINGS}")


def dequantize(target: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """Float32 map from stored members."""
    if target.dtype == np.int8:
        if scale is None:
            raise CorruptSample("int8 target without its target_scale member")
        return target.astype(np.float32) * scale.astype(np.float32)
    return target.astype(np.float32, copy=False)


def npy_bytes(array: np.ndarray) -> bytes:
    """``.npy`` bytes of an array (never pickled)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    """Array from ``.npy`` bytes; object arrays (pickles) are refused."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def png_bytes(image: np.ndarray, compress_level: int = 1) -> bytes:
    """Lossless PNG of an ``(H, W, 3)`` uint8 image."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """``(H, W, 3)`` uint8 from PNG bytes."""
    with Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert("RGB"))  # writable: users may modify samples in place


def encode_members(key: str, png: bytes, target: dict[str, np.ndarray], meta: dict) -> dict:
    """The tar members of one sample; checksums of image and target go into its metadata."""
    members = {"__key__": key, IMAGE_EXT: png, TARGET_EXT: npy_bytes(target["target"])}
    if "target_scale" in target:
        members[SCALE_EXT] = npy_bytes(target["target_scale"])
    meta = dict(meta, image_checksum=checksum(png), target_checksum=checksum(members[TARGET_EXT]))
    if SCALE_EXT in members:
        meta["target_scale_checksum"] = checksum(members[SCALE_EXT])
    members[META_EXT] = json.dumps(meta, sort_keys=True).encode()
    return members


def decode_members(sample: dict, verify: bool = True) -> dict:
    """A decoded sample ``{key, image, target, meta}`` from its tar members (bytes by extension)."""
    key = sample["__key__"]
    try:
        meta = json.loads(sample[META_EXT])
        png, tgt = sample[IMAGE_EXT], sample[TARGET_EXT]
    except KeyError as e:
        raise CorruptSample(f"sample {key}: missing member {e}") from None
    scale_bytes = sample.get(SCALE_EXT)
    if verify:
        pairs = [("image", png), ("target", tgt)] + ([("target_scale", scale_bytes)] if scale_bytes else [])
        for name, data in pairs:
            if checksum(data) != meta.get(f"{name}_checksum"):
                raise CorruptSample(f"sample {key}: {name} checksum mismatch")
    target = dequantize(load_npy(tgt), load_npy(scale_bytes) if scale_bytes else None)
    image = decode_png(png)
    if list(target.shape[:2]) != meta["grid"] or list(image.shape[:2]) != meta["image_size"]:
        raise CorruptSample(f"sample {key}: shapes {image.shape} / {target.shape} disagree with its metadata")
    return {"key": key, "image": image, "target": target, "meta": meta}
