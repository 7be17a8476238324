"""docs/method.md §3 augmentation: one frozen view per (seed, key, view), reproducible from those alone.

1. random resize: target (long, short) = scale x ratio, ratio ~ U[ratio_range]; the image is
   fitted inside it keeping its aspect ratio;
2. short side < min_side: upscale so it is min_side, floor both sides to `multiple`; otherwise
   with probability keep_prob keep the whole image (floored), else a random crop whose sides are
   drawn in [crop_ratio x side, side], at least min_side, floored to `multiple`;
3. horizontal flip with probability flip_prob.

All random numbers are drawn up front in a fixed order, so a view never depends on which branch
another draw took. Resizing is one bilinear (antialiased) resample from the decoded source.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from pipeline.config import check
from pipeline.storage import Storage


@dataclass(kw_only=True)
class AugmentConfig:
    """Knobs of the docs/method.md §3 augmentation; defaults are the paper's."""

    scale: list[int] = field(default_factory=lambda: [2048, 1024])  # (long, short) target before the ratio
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 1.0])  # ratio ~ U[lo, hi]
    min_side: int = 512  # shorter side after augmentation is at least this
    crop_ratio: float = 0.4  # random crop sides are drawn in [crop_ratio x side, side]
    keep_prob: float = 0.5  # probability of keeping the whole resized image instead of cropping
    flip_prob: float = 0.5  # horizontal flip probability
    multiple: int = 16  # output sides are floored to a multiple of this (the patch size)

    def __post_init__(self):
        check(len(self.scale) == 2 and min(self.scale) > 0, "augment.scale must be two positive ints (long, short)")
        check(len(self.ratio_range) == 2 and 0 < self.ratio_range[0] <= self.ratio_range[1],
              "augment.ratio_range must be [lo, hi] with 0 < lo <= hi")
        check(self.min_side >= self.multiple > 0, "augment.min_side must be >= augment.multiple > 0")
        check(0 < self.crop_ratio <= 1, "augment.crop_ratio must be in (0, 1]")
        check(0 <= self.keep_prob <= 1 and 0 <= self.flip_prob <= 1, "probabilities must be in [0, 1]")

    def max_output_side(self) -> int:
        """Upper bound of an output side for sources of aspect ratio <= max_aspect (memory planning)."""
        return max(self.scale) * max(self.ratio_range)


def view_rng(seed: int, key: str, view: int) -> np.random.Generator:
    """The generator of one (seed, key, view): independent of process, order and platform."""
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed), digest, int(view)])


def plan_view(height: int, width: int, seed: int, key: str, view: int, cfg: AugmentConfig) -> dict:
    """Geometry of one view of an H x W source: resize size, crop box and flip (no pixels touched)."""
    rng = view_rng(seed, key, view)
    ratio, keep_u, ch_u, cw_u, top_u, left_u, flip_u = rng.uniform(size=7)
    lo, hi = cfg.ratio_range
    ratio = lo + (hi - lo) * ratio
    long_t, short_t = int(max(cfg.scale) * ratio), int(min(cfg.scale) * ratio)
    factor = min(long_t / max(height, width), short_t / min(height, width))
    rh, rw = int(height * factor + 0.5), int(width * factor + 0.5)
    m = cfg.multiple
    if min(rh, rw) < cfg.min_side:
        up = cfg.min_side / min(rh, rw)
        rh, rw = max(cfg.min_side, int(rh * up + 0.5)), max(cfg.min_side, int(rw * up + 0.5))
        branch, ch, cw, top, left = "upscale", rh // m * m, rw // m * m, 0, 0
    elif keep_u < cfg.keep_prob:
        branch, ch, cw, top, left = "full", rh // m * m, rw // m * m, 0, 0
    else:
        ch = max(cfg.min_side, int(rh * (cfg.crop_ratio + (1 - cfg.crop_ratio) * ch_u))) // m * m
        cw = max(cfg.min_side, int(rw * (cfg.crop_ratio + (1 - cfg.crop_ratio) * cw_u))) // m * m
        top, left = int(top_u * (rh - ch + 1)), int(left_u * (rw - cw + 1))
        branch = "crop"
    return {"source_size": [height, width], "ratio": float(ratio), "resized": [rh, rw], "branch": branch,
            "crop": [top, left, ch, cw], "flip": bool(flip_u < cfg.flip_prob)}


def apply_view(image: np.ndarray, plan: dict) -> np.ndarray:
    """Pixels of a planned view: ``(H, W, 3)`` uint8 -> ``(h, w, 3)`` uint8, sides multiples of 16."""
    rh, rw = plan["resized"]
    top, left, ch, cw = plan["crop"]
    if (rh, rw) != tuple(image.shape[:2]):
        image = np.asarray(Image.fromarray(image).resize((rw, rh), Image.Resampling.BILINEAR))
    out = image[top:top + ch, left:left + cw]
    if plan["flip"]:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def augment(image: np.ndarray, seed: int, key: str, view: int, cfg: AugmentConfig) -> tuple[np.ndarray, dict]:
    """One augmented view of a decoded source image and the parameters that reproduce it."""
    plan = plan_view(image.shape[0], image.shape[1], seed, key, view, cfg)
    return apply_view(image, plan), plan


def augment_row(row: dict, *, seed: int, cfg: AugmentConfig, max_pixels: int, min_source_side: int,
                max_aspect: float, image_encoding: str, png_level: int, store: Storage) -> dict:
    """Ray Data stage ``row -> row``: read, decode, augment and encode (raw ``.npy`` or PNG) one
    (source, view); ``image_member`` holds the encoded bytes.

    Bad inputs become rows with an ``error`` reason (recorded later): decode failures and missing
    or denied files are bad inputs; a storage fault that outlasted the retries is recorded as
    ``transient: ...`` (the input is tried again by the next run); anything else is a bug and raises.
    Column ``retries`` carries the storage retries this row's stages made (JSON, see `pipeline.retry`).
    """
    from pipeline.samples import read_bytes
    from pipeline.cache.encode import encode_image
    from pipeline.cache.tasks import failure_reason, retries_taken
    from pipeline.codecs import BadImage, decode_image
    from pipeline.storage import public_url

    out = {"key": row["key"], "sample_key": row["sample_key"], "source": row["source"], "view": row["view"],
           "image": _PLACEHOLDER, "image_member": b"", "meta": "", "error": "", "lost": row.get("lost", 0),
           "retries": row.get("retries", "")}
    if row.get("error"):  # recorded upstream (an unreadable tar)
        return dict(out, error=row["error"])
    try:
        data = row["data"] if row.get("data") is not None else read_bytes(row["source"], store)
        image = decode_image(data, max_pixels=max_pixels, min_side=min_source_side, max_aspect=max_aspect)
    except BadImage as e:
        out["error"] = str(e)
    except OSError as e:  # missing, denied (bad input), or a storage fault past its retries (transient)
        out["error"] = failure_reason(e, "unreadable")
    if taken := retries_taken():  # this read's own retries, with those of the row's earlier stages
        out["retries"] = json.dumps(_merge_json(out["retries"], taken)) if out["retries"] else taken
    if out["error"]:
        return out
    view, plan = augment(image, seed, row["key"], int(row["view"]), cfg)
    meta = {"key": row["sample_key"], "source_key": row["key"], "source": public_url(row["source"]),
            "view": int(row["view"]), "augment": plan, "seed": seed}
    return dict(out, image=view, image_member=encode_image(view, image_encoding, png_level), meta=json.dumps(meta))


def _merge_json(a: str, b: str) -> dict:
    from pipeline.retry import merge

    return merge(merge({}, json.loads(a)), json.loads(b))


_PLACEHOLDER = np.zeros((1, 1, 3), dtype=np.uint8)  # keeps the column's type for error rows
