"""Sample encoding: targets as ``.npy`` (float16 / float32 / int8 + per-token scales), images as
raw uint8 ``.npy`` or lossless PNG, metadata as JSON -- and the reverse, with checksum verification.

A cached sample is one WebDataset group of tar members sharing a key::

    <key>.image.npy         the augmented image, exactly the pixels the teacher saw: (H, W, 3) uint8
      or <key>.png          the same pixels as a lossless PNG (image_encoding=png)
    <key>.target.npy        (h, w, D) in the cache's encoding
    <key>.target_scale.npy  (h, w, 1) float32 per-token scales (int8 only)
    <key>.json              metadata (source, augmentation, sizes, encoding, checksums)

Nothing here pickles: ``.npy`` members are written and read with ``allow_pickle=False``.
"""
from __future__ import annotations

import json
import zlib
from typing import TYPE_CHECKING

import numpy as np

from pipeline.codecs import decode_png, load_npy, npy_bytes, png_bytes

ENCODINGS = ("float16", "float32", "int8")
# image encoding -> its tar member. raw costs 3 B/px and no decode; PNG ~1.5-2 B/px of photos, but
# decoding it is what limits a training loader (`jobs/benchmark.py loader`), so raw is the default.
IMAGE_MEMBERS = {"raw": "image.npy", "png": "png"}
IMAGE_ENCODINGS = tuple(IMAGE_MEMBERS)
DEFAULT_IMAGE_ENCODING = "raw"
TARGET_EXT, SCALE_EXT, META_EXT = "target.npy", "target_scale.npy", "json"
IMAGE_MEMBER = "image_member"  # the column of the encoded image (raw .npy or PNG bytes) between the job's stages

if TYPE_CHECKING:  # the writer side quantizes torch tensors; readers decode with numpy alone
    import torch


class CorruptSample(ValueError):
    """A cached sample whose bytes do not match its recorded checksum or layout."""


def checksum(data: bytes) -> str:
    """Fast integrity checksum of a member (crc32; shards carry a sha256 as well)."""
    return f"crc32:{zlib.crc32(data):08x}"


def quantize(target: torch.Tensor, encoding: str) -> dict[str, torch.Tensor]:
    """Encode an ``(h, w, D)`` float map on its device: ``{"target": ..., ["target_scale": ...]}``.

    int8 uses symmetric per-token absmax scales: ``x ~= q * scale`` with ``scale = max|x| / 127``.
    """
    import torch

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

def encode_image(image: np.ndarray, encoding: str, png_level: int = 1) -> bytes:
    """The image member's bytes: ``(H, W, 3)`` uint8 as ``.npy`` (raw) or lossless PNG."""
    if encoding == "raw":
        return npy_bytes(image)
    if encoding == "png":
        return png_bytes(image, png_level)
    raise ValueError(f"unknown image encoding {encoding!r}; use one of {IMAGE_ENCODINGS}")


def image_member(sample: dict) -> tuple[str, bytes]:
    """(extension, bytes) of a sample's image member, whichever encoding it has."""
    for ext in IMAGE_MEMBERS.values():
        if ext in sample:
            return ext, sample[ext]
    raise KeyError(" or ".join(IMAGE_MEMBERS.values()))


def _decode_image_member(key: str, ext: str, data: bytes) -> np.ndarray:
    if ext == IMAGE_MEMBERS["png"]:
        return decode_png(data)
    image = load_npy(data)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise CorruptSample(f"sample {key}: image member is {image.dtype} {image.shape}, not (H, W, 3) uint8")
    return image


def encode_members(key: str, image: bytes, image_ext: str, target: dict[str, np.ndarray], meta: dict) -> dict:
    """The tar members of one sample (`image` is an `encode_image` result, stored under `image_ext`);
    checksums of image and target go into its metadata."""
    members = {"__key__": key, image_ext: image, TARGET_EXT: npy_bytes(target["target"])}
    if "target_scale" in target:
        members[SCALE_EXT] = npy_bytes(target["target_scale"])
    meta = dict(meta, image_checksum=checksum(image), target_checksum=checksum(members[TARGET_EXT]))
    if SCALE_EXT in members:
        meta["target_scale_checksum"] = checksum(members[SCALE_EXT])
    members[META_EXT] = json.dumps(meta, sort_keys=True).encode()
    return members


def decode_stored(sample: dict, verify: bool = True) -> dict:
    """A sample's members as stored: ``{key, image (H, W, 3) uint8, target (h, w, D) in the cache's
    dtype, [scale], meta}``, each member checked against its checksum first (`verify`). Arrays may
    be read-only views of the member bytes."""
    key = sample["__key__"]
    try:
        meta = json.loads(bytes(sample[META_EXT]))
        ext, image = image_member(sample)
        tgt = sample[TARGET_EXT]
    except KeyError as e:
        raise CorruptSample(f"sample {key}: missing member {e}") from None
    scale_bytes = sample.get(SCALE_EXT)
    if verify:
        pairs = [("image", image), ("target", tgt)] + ([("target_scale", scale_bytes)] if scale_bytes else [])
        for name, data in pairs:
            if checksum(data) != meta.get(f"{name}_checksum"):
                raise CorruptSample(f"sample {key}: {name} checksum mismatch")
    out = {"key": key, "image": _decode_image_member(key, ext, image), "target": load_npy(tgt), "meta": meta}
    if scale_bytes:
        out["scale"] = load_npy(scale_bytes)
    return out


def decode_members(sample: dict, verify: bool = True) -> dict:
    """A decoded sample ``{key, image, target, meta}`` from its tar members (bytes by extension),
    the target dequantised to float32 and the shapes checked against the metadata."""
    s = decode_stored(sample, verify)
    image, meta = s["image"], s["meta"]
    target = dequantize(s["target"], s.get("scale"))
    if list(target.shape[:2]) != meta["grid"] or list(image.shape[:2]) != meta["image_size"]:
        raise CorruptSample(f"sample {s['key']}: shapes {image.shape} / {target.shape} disagree with its metadata")
    return {"key": s["key"], "image": image, "target": target, "meta": meta}
