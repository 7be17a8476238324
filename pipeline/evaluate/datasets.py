"""The six open-vocabulary segmentation benchmarks of docs/method.md §5, read from their standard layouts.

No mmseg: each reader lists (image, label) pairs under a root (a local path or an fsspec URL)
and maps labels to ``0..C-1`` plus 255 (ignored):

* ``voc21`` / ``voc20``           Pascal VOC 2012 ``SegmentationClass`` (palette PNGs); voc20 drops label 0
* ``context60`` / ``context59``   Pascal Context as ``SegmentationClassContext`` PNGs (0 = background,
                                  1..59; the layout mmseg's converter writes); context59 drops label 0
* ``cityscapes``                  ``gtFine`` ``*_labelIds.png`` mapped to the 19 train ids
                                  (or ready-made ``*_labelTrainIds.png``)
* ``ade20k``                      ADEChallengeData2016, 150 classes, label 0 ("other") dropped

"Drop label 0" is mmseg's ``reduce_zero_label``: 0 -> 255, every other label -> label - 1.
Each entry of the registry also holds the benchmark's resize and post-processing defaults;
evaluation config keys override them.

Class names: two packaged lists per benchmark (docs/method.md §5). ``paper`` (the default,
``classes/<name>.txt``) is the list of the SCLIP / ClearCLIP / ProxyCLIP evaluations, which the
paper uses; ``curated`` (``classes/curated/<name>.txt``) is this project's list with more synonyms.
A result names its list as ``paper:voc21``, ``curated:voc21`` or the path / URL of a user's file.
"""
from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from pipeline import storage
from pipeline.storage import Storage
from pipeline.codecs import BadImage, decode_image

CLASS_DIR = Path(__file__).parent / "classes"
CLASS_LISTS = {"paper": CLASS_DIR, "curated": CLASS_DIR / "curated"}  # classes=<list> -> folder of <name>.txt
IGNORE = 255


class DatasetError(ValueError):
    """A dataset tree or file that does not have the expected layout; the message says what was expected."""


@dataclass(frozen=True)
class Sample:
    """One evaluation image and its label file."""

    key: str  # image id, unique within the split
    image: str  # URL of the image
    label: str  # URL of the label PNG
    label_format: str = "index"  # index (values are the labels) | cityscapes_ids (labelIds -> train ids)


@dataclass(frozen=True)
class DatasetSpec:
    """A benchmark: where its files are, its classes, and its evaluation settings (docs/method.md §5)."""

    name: str  # registry name and class-file stem
    title: str  # column title in result tables
    layout: str  # voc | context | cityscapes | ade
    num_classes: int
    reduce_zero_label: bool  # label 0 -> ignored, others shifted down by one
    scale: tuple[int, int] = (2048, 672)  # evaluation resize: fit inside (long, short)
    logit_scale: float = 40.0
    logit_bias: float = 0.0
    prob_thd: float = 0.0
    area_thd: float | None = None
    # (index, name) of classes that results and overlays call by the dataset's name rather than by
    # their class list's first synonym: a background prompted as what the dataset leaves unlabelled
    named: tuple[tuple[int, str], ...] = ()

    def class_file(self, class_list: str = "paper") -> Path:
        """A packaged class-name file (one class per line, comma-separated synonyms): `class_list`
        is ``paper`` (the default) or ``curated``."""
        if class_list not in CLASS_LISTS:
            raise DatasetError(f"unknown class list {class_list!r}; packaged: {list(CLASS_LISTS)}")
        return CLASS_LISTS[class_list] / f"{self.name}.txt"


DATASETS: dict[str, DatasetSpec] = {s.name: s for s in [
    DatasetSpec("voc21", "VOC21", "voc", 21, False, logit_scale=65.0, prob_thd=0.1, area_thd=0.1,
                named=((0, "background"),)),
    DatasetSpec("voc20", "VOC20", "voc", 20, True),
    DatasetSpec("context60", "Context60", "context", 60, False, logit_scale=50.0, prob_thd=0.1,
                named=((0, "background"),)),
    DatasetSpec("context59", "Context59", "context", 59, True),
    DatasetSpec("cityscapes", "Cityscapes", "cityscapes", 19, False, scale=(2048, 1024)),
    DatasetSpec("ade20k", "ADE20K", "ade", 150, True),
]}

LAYOUTS = {
    "voc": """<root>/VOCdevkit/VOC2012/  (or <root>/VOC2012/, or <root> itself)
  JPEGImages/<id>.jpg
  SegmentationClass/<id>.png           palette PNG: 0 = background, 1..20, 255 = boundary
  ImageSets/Segmentation/<split>.txt   one <id> per line""",
    "context": """<root>/VOCdevkit/VOC2010/  (or <root>/VOC2010/, or <root> itself)
  JPEGImages/<id>.jpg
  SegmentationClassContext/<id>.png    single-channel PNG: 0 = background, 1..59 (mmseg's converter output)
  ImageSets/SegmentationContext/<split>.txt""",
    "cityscapes": """<root>/  (or <root>/cityscapes/)
  leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png   (or *_gtFine_labelTrainIds.png)""",
    "ade": """<root>/ADEChallengeData2016/  (or <root> itself)
  images/<validation|training>/<id>.jpg
  annotations/<validation|training>/<id>.png   0 = other, 1..150""",
}

# Cityscapes label id -> train id (cityscapesscripts' labels.py); everything else is ignored.
_CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                         25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_LUT = np.full(256, IGNORE, dtype=np.uint8)
CITYSCAPES_LUT[list(_CITYSCAPES_TRAIN_IDS)] = list(_CITYSCAPES_TRAIN_IDS.values())


def list_datasets() -> list[str]:
    """Names accepted by `get_dataset`, in table order."""
    return list(DATASETS)


def get_dataset(name: str) -> DatasetSpec:
    """The registry entry for `name` (case-insensitive), or a DatasetError listing the known names."""
    try:
        return DATASETS[name.lower()]
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r}; known: {list_datasets()}") from None


def class_source(dataset: str, classes: str | None = None) -> str:
    """The name of the class list an evaluation of `dataset` uses, as its results record it:
    ``<list>:<dataset>`` for a packaged list (`classes` null = ``paper``, or ``curated``), else
    `classes` itself, the path / URL of a class file."""
    name = get_dataset(dataset).name
    if not classes or classes in CLASS_LISTS:
        return f"{classes or 'paper'}:{name}"
    return classes


def display_names(spec: DatasetSpec | None, first_synonyms: Sequence[str]) -> tuple[str, ...]:
    """The names results, tables and overlays give the classes of `spec` (None: no dataset): each
    class's first synonym, except the classes the dataset names itself (`DatasetSpec.named`). VOC21's
    background is prompted as "sky, wall, tree, ..." (what VOC leaves unlabelled) but is reported
    as ``background``, whichever class list the run embeds."""
    names = list(first_synonyms)
    for index, name in spec.named if spec is not None else ():
        if index < len(names):
            names[index] = name
    return tuple(names)


def _packaged(source: str) -> Path | None:
    """The packaged file of a dataset name (its paper list) or of ``<list>:<dataset>``; None otherwise."""
    class_list, _, name = source.lower().rpartition(":")
    if name in DATASETS and class_list in ("", *CLASS_LISTS):
        return DATASETS[name].class_file(class_list or "paper")
    return None


def load_class_lines(source: str, store: Storage | None = None) -> list[str]:
    """Class lines of a dataset name (its paper list), of a packaged list named ``<list>:<dataset>``
    (``curated:voc21``), or of a class file at a path / URL (read through `store`, default:
    standard credentials)."""
    packaged = _packaged(source)
    if packaged is not None:
        text = packaged.read_text(encoding="utf-8")
    else:
        text = (store or Storage()).read_text(source)
    return [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _layout_error(spec: DatasetSpec, root: str, problem: str) -> DatasetError:
    return DatasetError(f"{spec.name}: {problem} under {root!r}. Expected the standard layout:\n"
                        f"{LAYOUTS[spec.layout]}")


def _find_base(spec: DatasetSpec, store: Storage, root: str, candidates: list[str], marker: str) -> str:
    """The first of `root`/<candidate> that contains `marker` (a relative path)."""
    if not store.exists(root):
        raise DatasetError(f"{spec.name}: dataset root {root!r} does not exist")
    for sub in candidates:
        base = storage.join(root, sub) if sub else root
        if store.exists(storage.join(base, marker)):
            return base
    raise _layout_error(spec, root, f"found no {marker}")


def _names(store: Storage, url: str, suffix: str, recursive: bool = False) -> dict[str, str]:
    """{relative path without `suffix`: URL} of the files under `url` that end in `suffix`."""
    out = {}
    for f in store.list_files(url, suffixes=(suffix,), recursive=recursive):
        rel = store.relative(f, url) if recursive else posixpath.basename(f)
        out[rel[: -len(suffix)]] = f
    return out


def _check_pairs(spec: DatasetSpec, root: str, wanted: list[str], images: dict, labels: dict) -> list[Sample]:
    missing = [(k, "image") for k in wanted if k not in images] + [(k, "label") for k in wanted if k not in labels]
    if missing:
        shown = ", ".join(f"{k} ({what})" for k, what in missing[:5])
        raise _layout_error(spec, root, f"{len(missing)} files of the split are missing, e.g. {shown},")
    if not wanted:
        raise _layout_error(spec, root, "the split lists no images")
    return [Sample(k, images[k], labels[k]) for k in wanted]


def _list_voc_like(spec: DatasetSpec, store: Storage, root: str, split: str) -> list[Sample]:
    year, label_dir, list_dir = (("VOC2012", "SegmentationClass", "Segmentation") if spec.layout == "voc"
                                 else ("VOC2010", "SegmentationClassContext", "SegmentationContext"))
    split_file = f"ImageSets/{list_dir}/{split}.txt"
    base = _find_base(spec, store, root, [f"VOCdevkit/{year}", year, ""], split_file)
    ids = [ln.split()[0] for ln in store.read_text(storage.join(base, split_file)).splitlines() if ln.strip()]
    images = _names(store, storage.join(base, "JPEGImages"), ".jpg")
    labels = _names(store, storage.join(base, label_dir), ".png")
    return _check_pairs(spec, root, ids, images, labels)


def _list_cityscapes(spec: DatasetSpec, store: Storage, root: str, split: str) -> list[Sample]:
    base = _find_base(spec, store, root, ["", "cityscapes"], f"gtFine/{split}")
    if not store.exists(storage.join(base, "leftImg8bit", split)):
        raise _layout_error(spec, root, f"found gtFine/{split} but no leftImg8bit/{split}")
    images = _names(store, storage.join(base, "leftImg8bit", split), "_leftImg8bit.png", recursive=True)
    ids = _names(store, storage.join(base, "gtFine", split), "_gtFine_labelIds.png", recursive=True)
    train_ids = _names(store, storage.join(base, "gtFine", split), "_gtFine_labelTrainIds.png", recursive=True)
    labels = {**{k: (v, "index") for k, v in train_ids.items()}, **{k: (v, "cityscapes_ids") for k, v in ids.items()}}
    pairs = _check_pairs(spec, root, sorted(images), images, labels)
    return [Sample(s.key, s.image, s.label[0], s.label[1]) for s in pairs]


def _list_ade(spec: DatasetSpec, store: Storage, root: str, split: str) -> list[Sample]:
    folder = {"val": "validation", "train": "training"}.get(split, split)
    base = _find_base(spec, store, root, ["ADEChallengeData2016", ""], f"annotations/{folder}")
    images = _names(store, storage.join(base, "images", folder), ".jpg")
    labels = _names(store, storage.join(base, "annotations", folder), ".png")
    return _check_pairs(spec, root, sorted(images) or sorted(labels), images, labels)


_LISTERS = {"voc": _list_voc_like, "context": _list_voc_like, "cityscapes": _list_cityscapes, "ade": _list_ade}


def list_samples(spec: DatasetSpec | str, root: str, split: str = "val", store: Storage | None = None) -> list[Sample]:
    """Every (image, label) pair of a split, sorted by key; DatasetError if the tree is not the
    expected layout or a listed file is missing. `store`: how to read `root` (default: standard
    credentials)."""
    spec = get_dataset(spec) if isinstance(spec, str) else spec
    root = str(root).rstrip("/") or "/"
    return sorted(_LISTERS[spec.layout](spec, store or Storage(), root, split), key=lambda s: s.key)


def decode_label(spec: DatasetSpec, data: bytes, label_format: str = "index", name: str = "label") -> np.ndarray:
    """Label PNG bytes -> ``(H, W)`` uint8 in ``0..C-1`` plus 255, with the dataset's mapping applied."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:
        raise DatasetError(f"{name}: not a readable label image ({type(e).__name__}: {e})") from None
    if img.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
        raise DatasetError(f"{name}: label image has mode {img.mode}; expected one channel of class indices "
                           "(palette or grayscale PNG), not colour-coded labels")
    raw = np.asarray(img)
    if raw.size and (raw.min() < 0 or raw.max() > 255):
        raise DatasetError(f"{name}: label values {raw.min()}..{raw.max()} do not fit 0..255")
    label = raw.astype(np.uint8)
    if label_format == "cityscapes_ids":
        label = CITYSCAPES_LUT[label]
    if spec.reduce_zero_label:
        label = np.where(label == 0, IGNORE, label - 1).astype(np.uint8)
        label[label == IGNORE - 1] = IGNORE  # 255 - 1: the ignore label stays ignored
    bad = label[(label != IGNORE) & (label >= spec.num_classes)]
    if bad.size:
        raise DatasetError(f"{name}: labels up to {int(bad.max())} after mapping, but {spec.name} has "
                           f"{spec.num_classes} classes (0..{spec.num_classes - 1}, 255 ignored); is this "
                           f"the {spec.name} annotation?")
    return label


def decode_rgb(data: bytes, name: str = "image", max_pixels: int = 100_000_000) -> np.ndarray:
    """Image bytes -> ``(H, W, 3)`` uint8 RGB (no EXIF rotation: labels are stored unrotated)."""
    try:
        return decode_image(data, max_pixels=max_pixels, upright=False)
    except BadImage as e:
        raise DatasetError(f"{name}: {e}") from None


def load_sample(spec: DatasetSpec, sample: Sample, store: Storage | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read one sample: RGB uint8 ``(H, W, 3)`` and its mapped label ``(H, W)``."""
    store = store or Storage()
    image = decode_rgb(store.read_bytes(sample.image), sample.image)
    label = decode_label(spec, store.read_bytes(sample.label), sample.label_format, sample.label)
    if image.shape[:2] != label.shape:
        raise DatasetError(f"{sample.key}: image {image.shape[1]}x{image.shape[0]} and label "
                           f"{label.shape[1]}x{label.shape[0]} differ in size")
    return image, label
