"""Tiny segmentation benchmarks in their real on-disk layouts, built on the spot.

Each builder writes a few images and label PNGs exactly where the real dataset keeps them and
returns the raw label arrays it wrote, so tests can check the reader's mapping against them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.samples import synthetic_scene

VOC_PALETTE = [0, 0, 0] * 256  # palette PNGs store indices; the colours do not matter to readers
for _i in range(256):
    VOC_PALETTE[3 * _i:3 * _i + 3] = [(_i * 37) % 256, (_i * 91) % 256, (_i * 53) % 256]


def raw_label(h: int, w: int, values: list[int], seed: int, ignore: bool = True) -> np.ndarray:
    """Blocks of the given label values, plus a 255 boundary line when `ignore`."""
    rng = np.random.default_rng(seed)
    lab = np.full((h, w), values[0], dtype=np.uint8)
    for v in values[1:]:
        y, x = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        lab[y:y + int(rng.integers(6, h // 2 + 7)), x:x + int(rng.integers(6, w // 2 + 7))] = v
    if ignore:
        lab[h // 2, :] = 255
    return lab


def _save_label(path: Path, lab: np.ndarray, palette: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:
        img = Image.frombytes("P", (lab.shape[1], lab.shape[0]), np.ascontiguousarray(lab).tobytes())
        img.putpalette(VOC_PALETTE)
    else:
        img = Image.fromarray(lab)  # 8-bit grayscale ("L")
    img.save(path)


def _save_image(path: Path, h: int, w: int, seed: int, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_scene(h, w, seed)).save(path, format=fmt)


def make_voc(root: Path, sizes: list[tuple[int, int]], context: bool = False, split: str = "val") -> dict:
    """``root/VOCdevkit/VOC2012`` (or ``VOC2010`` with Context labels); returns {id: raw label}."""
    year, label_dir, list_dir = (("VOC2010", "SegmentationClassContext", "SegmentationContext") if context
                                 else ("VOC2012", "SegmentationClass", "Segmentation"))
    base = root / "VOCdevkit" / year
    labels = {}
    values = [0, 59, 1, 33] if context else [0, 20, 1, 15]
    for i, (h, w) in enumerate(sizes):
        key = f"2008_{i:06d}"
        _save_image(base / "JPEGImages" / f"{key}.jpg", h, w, i)
        labels[key] = raw_label(h, w, values, seed=i)
        _save_label(base / label_dir / f"{key}.png", labels[key], palette=not context)
    _save_image(base / "JPEGImages" / "2008_999999.jpg", 40, 40, 9)  # an image outside the split
    (base / "ImageSets" / list_dir).mkdir(parents=True, exist_ok=True)
    (base / "ImageSets" / list_dir / f"{split}.txt").write_text("".join(f"{k}\n" for k in labels))
    return labels


def make_cityscapes(root: Path, cities: dict[str, list[tuple[int, int]]], train_ids: bool = False,
                    split: str = "val") -> dict:
    """``root/leftImg8bit/<split>/<city>/`` and ``root/gtFine/<split>/<city>/``; {city/stem: raw label}."""
    labels = {}
    values = [7, 26, 0, 33, 4, 24] if not train_ids else [0, 13, 255, 18, 11]
    n = 0
    for city, sizes in cities.items():
        for h, w in sizes:
            stem = f"{city}_{n:06d}_000019"
            _save_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", h, w, n, "PNG")
            labels[f"{city}/{stem}"] = lab = raw_label(h, w, values, seed=n, ignore=False)
            suffix = "labelTrainIds" if train_ids else "labelIds"
            _save_label(root / "gtFine" / split / city / f"{stem}_gtFine_{suffix}.png", lab, palette=False)
            # the colour and instance files of the real download sit alongside; readers must skip them
            Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(root / "gtFine" / split / city / f"{stem}_gtFine_color.png")
            n += 1
    return labels


def make_ade(root: Path, sizes: list[tuple[int, int]], split_dir: str = "validation",
             values: list[int] | None = None) -> dict:
    """``root/ADEChallengeData2016/{images,annotations}/<split_dir>/``; returns {id: raw label}."""
    base = root / "ADEChallengeData2016"
    labels = {}
    for i, (h, w) in enumerate(sizes):
        key = f"ADE_val_{i + 1:08d}"
        _save_image(base / "images" / split_dir / f"{key}.jpg", h, w, 20 + i)
        labels[key] = raw_label(h, w, values or [0, 150, 1, 3, 12], seed=20 + i, ignore=False)
        _save_label(base / "annotations" / split_dir / f"{key}.png", labels[key], palette=False)
    return labels
