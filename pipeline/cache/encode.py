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

import json
import zlib

import numpy as np
import torch

from pipeline.codecs import decode_png, load_npy, npy_bytes

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


def decode_stored(sample: dict, verify: bool = True) -> dict:
    """A sample's members as stored: ``{key, image (H, W, 3) uint8, target (h, w, D) in the cache's
    dtype, [scale], meta}``, each member checked against its checksum first (`verify`). Arrays may
    be read-only views of the member bytes."""
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
    out = {"key": key, "image": decode_png(png), "target": load_npy(tgt), "meta": meta}
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
