"""Segment one image with free-text classes: `python jobs/segment.py image=<path or URL> classes="cat, dog, sky"`.

Writes, next to each other (``output`` is a directory, or the overlay's ``.png`` path):

* ``<stem>.png``           the image blended with one colour per class, with a legend, at the input's size
* ``<stem>.mask.png``      class index per pixel (palette PNG, same colours)
* ``<stem>.json``          classes, colours, pixel shares, settings
* ``<stem>.features.npy``  with ``save_features=true``: the dense map ``(h, w, D)`` float32

Any image size works: the image is resized like the evaluation (``scale``, or ``scale=null`` for
its own size), fitted to the patch grid (crop or pad), and the logits are brought back to the
input's size. ``checkpoint=`` runs the SPAR student; ``features=sliding`` the teacher.
"""
from __future__ import annotations

import io
import json
import logging
import posixpath
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import spar
from pipeline import storage
from pipeline.config import ConfigError, check, redacted_repr, resolve_paths, resolve_weights, to_dict
from pipeline.evaluate.datasets import DATASETS, display_names, load_class_lines
from pipeline.evaluate.evaluator import check_text_backbone
from pipeline.codecs import decode_image, npy_bytes, png_bytes
from pipeline.devices import AMP_DTYPES, pick_device
from pipeline.samples import read_bytes
from pipeline.storage import Storage

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SegmentConfig:
    """`jobs/segment.py`: open-vocabulary segmentation of one image."""

    image: str = ""  # path or URL (file://, s3://, https://..., builtin://photo/grace_hopper.jpg) of the image (required)
    classes: str = ""  # "cat, dog, sky"; synonyms with | ("person | man | woman, sky"); a dataset name; or a class file (required)
    output: str = "out/segment"  # directory for <stem>.png etc., or the overlay's .png path
    backbone: str = "maskclip"
    pretrained: Optional[str] = "default"  # open_clip tag, file / URL (dinov3txt: backbone.pth,dinotxt.pth), or null
    checkpoint: Optional[str] = None  # SPAR student weights (student.safetensors[,dinotxt.pth]); replaces `pretrained`
    init_seed: int = 0
    features: str = "single"  # single (one pass: the pre-trained model, or the student) | sliding (teacher)
    sliding_mode: str = "feature"  # feature | logits (SCLIP-style)
    stride: int = 24
    crop: Optional[int] = None
    window_batch: int = 64
    amp_dtype: str = "float32"
    device: str = "auto"
    threads: Optional[int] = None
    scale: Optional[list[int]] = field(default_factory=lambda: [2048, 672])  # resize (long, short) or null
    logit_scale: float = 40.0
    logit_bias: float = 0.0
    prob_thd: float = 0.0  # pixels less sure than this become the first class (list a background first)
    area_thd: float = 0.0  # drop classes >= 1 covering at most this share of the class >= 1 area; 0 = off
    alpha: float = 0.5  # weight of the class colours in the overlay
    save_features: bool = False  # also write the dense feature map as .npy
    max_pixels: int = 100_000_000  # refuse larger images (decompression bombs)
    storage_options: dict[str, Any] = field(default_factory=dict)

    __repr__ = redacted_repr  # without storage_options' secrets, wherever a config is printed

    def __post_init__(self):
        check(bool(self.image), "image=<path or URL> is required")
        check(bool(self.classes.strip()), 'classes="cat, dog, sky" (or a dataset name / class file) is required')
        check_text_backbone(self.backbone, self.pretrained, needs_pretrained=not self.checkpoint)
        check(self.features in ("single", "sliding"), "features must be single or sliding (the student is "
                                                      "features=single with checkpoint=...)")
        check(self.sliding_mode in ("feature", "logits"), "sliding_mode must be feature or logits")
        check(not (self.save_features and self.features == "sliding" and self.sliding_mode == "logits"),
              "save_features needs a feature map: sliding_mode=logits has none")
        check(self.amp_dtype in AMP_DTYPES, f"amp_dtype must be one of {list(AMP_DTYPES)}")
        check(0.0 <= self.alpha <= 1.0, "alpha must be in [0, 1]")
        check(self.scale is None or (len(self.scale) == 2 and min(self.scale) >= 1), "scale must be [long, short] or null")
        if self.pretrained == "default":
            self.pretrained = spar.get_spec(self.backbone).default_pretrained
        self.pretrained, self.checkpoint = resolve_weights(self.pretrained), resolve_weights(self.checkpoint)
        resolve_paths(self, "image", "output")
        if _is_class_file(self.classes):
            resolve_paths(self, "classes")


def _is_class_file(text: str) -> bool:
    return text.strip().lower().endswith(".txt") and "," not in text


def parse_classes(text: str, store: Storage | None = None) -> list[str]:
    """`classes=` -> class lines: a dataset name, a class file (``.txt`` path or URL), or inline
    ``"a, b | b2, c"`` (commas separate classes, ``|`` separates a class's synonyms)."""
    text = text.strip()
    if text.lower() in DATASETS or _is_class_file(text):
        return load_class_lines(text, store)
    lines = []
    for part in text.split(","):
        syns = [s.strip() for s in part.split("|")]
        if not all(syns):
            raise ConfigError(f"empty class name in classes={text!r} (stray comma or |?)")
        lines.append(", ".join(syns))
    return lines


def class_colors(n: int) -> np.ndarray:
    """``(n, 3)`` uint8 distinct colours: golden-ratio hue steps, alternating brightness."""
    import colorsys

    out = [colorsys.hsv_to_rgb((0.13 + i * 0.618033988749895) % 1.0, 0.75 if i % 2 else 0.95,
                               0.95 if i % 3 else 0.75) for i in range(n)]
    return (np.array(out).reshape(n, 3) * 255).round().astype(np.uint8)


@dataclass
class Legend:
    """Where the legend went: its box and one (class, colour, swatch box) per listed class."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive)
    entries: list[tuple[str, tuple[int, int, int], tuple[int, int, int, int]]]
    hidden: int  # present classes that did not fit


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed bitmap font
        return ImageFont.load_default()


def draw_legend(img: Image.Image, pred: np.ndarray, names: tuple[str, ...] | list[str], colors: np.ndarray) -> Legend:
    """Draw a legend of the classes present in `pred` (largest first, with their pixel share) into
    the top-left corner of `img`, in place; rows that do not fit become "+N more"."""
    h, w = pred.shape
    counts = np.bincount(pred.ravel(), minlength=len(names))
    present = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    size = int(np.clip(round(min(h, w) / 30), 10, 28))
    pad = max(2, size // 4)
    row = size + pad
    max_rows = max(1, (h - pad) // row)
    shown = present if len(present) <= max_rows else present[: max_rows - 1]
    hidden = len(present) - len(shown)
    texts = [f"{names[i]}  {100 * counts[i] / pred.size:.1f}%" for i in shown] + ([f"+{hidden} more"] if hidden else [])
    draw = ImageDraw.Draw(img, "RGBA")
    font = _font(size)
    text_w = max(draw.textlength(t, font=font) for t in texts)
    box = (0, 0, min(w, int(3 * pad + size + text_w)) - 1, min(h, pad + row * len(texts)) - 1)
    draw.rectangle(box, fill=(0, 0, 0, 150))  # translucent: the segmentation stays visible beneath
    entries = []
    for k, t in enumerate(texts):
        y = pad + k * row
        if k < len(shown):
            color = tuple(int(c) for c in colors[shown[k]])
            swatch = (pad, y, pad + size - 1, y + size - 1)
            draw.rectangle(swatch, fill=color + (255,))
            entries.append((names[shown[k]], color, swatch))
        draw.text((2 * pad + size, y), t, fill=(255, 255, 255, 255), font=font)
    return Legend(box, entries, hidden)


def render_overlay(image: np.ndarray, pred: np.ndarray, names, alpha: float = 0.5,
                   colors: np.ndarray | None = None) -> tuple[Image.Image, Legend]:
    """The image blended with each pixel's class colour, plus a legend; same size as `image`."""
    colors = class_colors(len(names)) if colors is None else colors
    blend = image.astype(np.float32) * (1 - alpha) + colors[pred].astype(np.float32) * alpha
    out = Image.fromarray(blend.round().clip(0, 255).astype(np.uint8))
    return out, draw_legend(out, pred, names, colors)


def output_paths(cfg: SegmentConfig) -> dict[str, str]:
    """URLs of the overlay, mask, JSON and features files of a run."""
    if cfg.output.lower().endswith(".png"):
        base = cfg.output[:-4]
    else:
        stem = posixpath.basename(urllib.parse.urlparse(cfg.image).path.rstrip("/")) or "image"
        base = storage.join(cfg.output, stem.rsplit(".", 1)[0] or stem)
    return {"overlay": base + ".png", "mask": base + ".mask.png", "json": base + ".json",
            "features": base + ".features.npy"}


def _mask_png(pred: np.ndarray, colors: np.ndarray) -> bytes:
    """Class indices as a palette PNG (16-bit grayscale beyond the palette's 256 entries)."""
    if len(colors) > 256:
        mask = Image.fromarray(pred.astype(np.uint16))
    else:
        indices = np.ascontiguousarray(pred, dtype=np.uint8)
        mask = Image.frombytes("P", (pred.shape[1], pred.shape[0]), indices.tobytes())
        mask.putpalette(colors.reshape(-1).tolist())
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return buf.getvalue()


def run(cfg: SegmentConfig) -> dict:
    """Segment `cfg.image`; write the overlay, mask, summary (and features); return the summary."""
    store = Storage(cfg.storage_options)
    lines = parse_classes(cfg.classes, store)
    image = decode_image(read_bytes(cfg.image, store), max_pixels=cfg.max_pixels)
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    weights = cfg.checkpoint or cfg.pretrained
    bb = store.call("weights", weights or "", lambda: spar.load_backbone(  # fetched under the retry policy
        cfg.backbone, pretrained=weights, device=device, init_seed=cfg.init_seed,
        storage_options=store.weights_options(weights or "")))
    clf = spar.build_classifier(bb, lines)
    settings = spar.FeatureSettings(mode=cfg.features, sliding_mode=cfg.sliding_mode, stride=cfg.stride,
                                    crop=cfg.crop, window_batch=cfg.window_batch, amp_dtype=AMP_DTYPES[cfg.amp_dtype])
    post = spar.PostProcess(cfg.logit_scale, cfg.logit_bias, cfg.prob_thd, cfg.area_thd or None)
    t = time.perf_counter()
    seg = spar.segment_image(bb, torch.from_numpy(image), clf, settings, post,
                             tuple(cfg.scale) if cfg.scale else None, keep_features=cfg.save_features)
    pred = seg.pred.cpu().numpy()
    seconds = time.perf_counter() - t
    names = display_names(DATASETS.get(cfg.classes.strip().lower()), clf.class_names)  # classes=voc21: background
    colors = class_colors(clf.num_classes)
    overlay, legend = render_overlay(image, pred, names, cfg.alpha, colors)
    paths = output_paths(cfg)
    store.write_bytes(paths["overlay"], png_bytes(np.asarray(overlay), compress_level=6))
    store.write_bytes(paths["mask"], _mask_png(pred, colors))
    if cfg.save_features:
        store.write_bytes(paths["features"], npy_bytes(seg.features.cpu().numpy()))
    counts = np.bincount(pred.ravel(), minlength=clf.num_classes)
    owner = clf.synonym_to_class.tolist()
    synonyms = [[s for s, o in zip(clf.synonyms, owner) if o == i] for i in range(clf.num_classes)]
    summary = {
        "image": storage.public_url(cfg.image), "size": list(image.shape[:2]),
        "overlay": paths["overlay"], "mask": paths["mask"],
        "features": paths["features"] if cfg.save_features else None,
        "feature_shape": list(seg.features.shape) if cfg.save_features else None,
        "classes": [{"name": n, "synonyms": synonyms[i], "color": colors[i].tolist(),
                     "fraction": float(counts[i] / pred.size)} for i, n in enumerate(names)],
        "legend_hidden": legend.hidden, "seconds": seconds, "config": to_dict(cfg),
    }
    store.write_text(paths["json"], json.dumps(summary, indent=2))
    log.info("wrote %s (%dx%d, %d classes, %.2f s)", paths["overlay"], image.shape[1], image.shape[0],
             clf.num_classes, seconds)
    return summary
