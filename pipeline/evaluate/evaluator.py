"""What evaluation computes for one image, shared by the local loop (`job`) and the Ray fan-out
(`fanout`): the run's config, the models and text classifiers of its feature modes (`Evaluator`),
and the per-mode sums (`Totals`)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

import spar
from pipeline.config import ConfigError, check, redacted_repr, resolve_paths, resolve_weights
from pipeline.devices import AMP_DTYPES, device_name, pick_device, synchronize
from pipeline.evaluate.datasets import (CLASS_LISTS, DatasetSpec, class_source, display_names, get_dataset,
                                       load_class_lines)
from pipeline.storage import Storage
from spar.metrics import confusion_matrix
from spar.segment import FeatureSettings, PostProcess, segment_image

MODES = ("single", "sliding", "student")

# Post-processing of the reference configs that differ from a benchmark's defaults, by backbone family
# (docs/method.md §5): DINOv3.txt's VOC21 config sets logit_scale 65 and no probability / area threshold.
BACKBONE_POSTPROCESS: dict[tuple[str, str], dict[str, Any]] = {
    ("dinov3txt", "voc21"): {"prob_thd": 0.0, "area_thd": None},
}


def check_text_backbone(backbone: str, pretrained: str | None, needs_pretrained: bool) -> None:
    """ConfigError unless `backbone` can embed class names, and (if its pre-trained weights are used)
    has weights to load: checked at parse time, before any work starts."""
    spec = spar.get_spec(backbone)
    check(spec.has_text, f"backbone {backbone!r} has no text tower, so it cannot segment with class names; "
                         "timm: backbones cache and train only (evaluate and segment with maskclip, siglip2 or "
                         "dinov3txt)")
    if needs_pretrained and pretrained == "default" and spec.default_pretrained == "default":
        from spar.timm_backbones import DINOV3_FILES_HELP

        raise ConfigError(f"backbone={backbone}: " + DINOV3_FILES_HELP)


@dataclass(kw_only=True)
class EvalConfig:
    """`jobs/evaluate.py`: mIoU and images/s of single pass / sliding teacher / student on one benchmark."""

    dataset: str = ""  # voc21 | voc20 | context60 | context59 | cityscapes | ade20k (required)
    root: str = ""  # dataset root: local dir or fsspec URL (required)
    split: str = "val"
    features: str = "all"  # single | sliding | student | all, or a comma list (single,student)
    backbone: str = "maskclip"  # spar registry name
    pretrained: Optional[str] = "default"  # weights of single / sliding: open_clip tag, file / URL, or null
    checkpoint: Optional[str] = None  # student weights (training's student.safetensors): path or URL
    init_seed: int = 0  # seed of a random init (pretrained=null)
    stride: int = 24  # sliding stride in pixels
    crop: Optional[int] = None  # sliding window; default the backbone's pre-training size
    sliding_mode: str = "feature"  # feature (teacher map, docs/method.md §2) | logits (SCLIP-style per-pixel average)
    window_batch: int = 64  # windows per ViT forward in the sliding mode
    amp_dtype: str = "float32"  # float32 (exact) | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    threads: Optional[int] = None  # torch CPU threads (default: torch's)
    classes: Optional[str] = None  # null / paper (the paper's packaged list) | curated | a class file (path / URL)
    scale: Optional[list[int]] = None  # evaluation resize (long, short); default the dataset's
    logit_scale: Optional[float] = None  # post-processing; null = the dataset's default (docs/method.md §5)
    logit_bias: Optional[float] = None
    prob_thd: Optional[float] = None
    area_thd: Optional[float] = None  # 0 disables
    limit: Optional[int] = None  # only the first N images (sorted by id): smoke runs, timing
    warmup: bool = True  # one untimed pass per mode on a window-sized image before timing
    prefetch: int = 4  # images decoded ahead by background threads
    skip_bad: bool = False  # skip unreadable samples (recorded) instead of failing
    output: str = "out/eval"  # results root (local dir or fsspec URL)
    ray: bool = False  # evaluate on a Ray actor pool
    actor_gpus: float = -1.0  # with ray: GPUs per actor; -1 = 1 unless device=cpu or the cluster has and can get no GPU
    actor_cpus: float = -1.0  # with ray: CPUs per actor; -1 = 1 with GPUs, else 0.5 (whole CPUs deadlock small hosts)
    min_actors: int = 0  # with ray: pool size range; 0 = GPUs there now (at least 1) / 1 on CPU
    max_actors: int = 0  # with ray: 0 = every GPU the cluster has or its autoscaler can add / as min_actors on CPU
    num_actors: int = 0  # with ray: a fixed pool size (overrides min_actors and max_actors)
    ray_address: Optional[str] = None  # attach here; default RAY_ADDRESS or a new local cluster
    num_cpus: Optional[int] = None  # CPUs of a local cluster this job starts
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for root / output / checkpoint

    __repr__ = redacted_repr  # without storage_options' secrets, wherever a config is printed

    def __post_init__(self):
        check(bool(self.dataset), "dataset=<name> is required (voc21, voc20, context60, context59, cityscapes, ade20k)")
        check(bool(self.root), "root=<dataset directory or URL> is required")
        get_dataset(self.dataset)
        check(bool(self.modes) and all(m in MODES for m in self.modes),
              f"features must be all or a comma-separated list of {MODES}, got {self.features!r}")
        check_text_backbone(self.backbone, self.pretrained, needs_pretrained=self.modes != ["student"])
        check(self.sliding_mode in ("feature", "logits"), "sliding_mode must be feature or logits")
        check(self.amp_dtype in AMP_DTYPES, f"amp_dtype must be one of {list(AMP_DTYPES)}")
        check(self.stride >= 1 and self.window_batch >= 1, "stride and window_batch must be >= 1")
        check(self.limit is None or self.limit >= 1, "limit must be >= 1")
        check(self.scale is None or (len(self.scale) == 2 and min(self.scale) >= 1), "scale must be [long, short]")
        check("student" not in self.modes or bool(self.checkpoint),
              f"features={self.features} needs checkpoint=<student.safetensors path or URL>")
        if self.pretrained == "default":
            self.pretrained = spar.get_spec(self.backbone).default_pretrained
        self.pretrained, self.checkpoint = resolve_weights(self.pretrained), resolve_weights(self.checkpoint)
        resolve_paths(self, "root", "output")
        if self.classes not in CLASS_LISTS:  # null or a class file
            resolve_paths(self, "classes")

    @property
    def modes(self) -> list[str]:
        """The feature modes this run evaluates, in table order."""
        if self.features.strip() == "all":
            return list(MODES)
        wanted = {m.strip() for m in self.features.split(",") if m.strip()}
        return [m for m in MODES if m in wanted] + sorted(wanted - set(MODES))


def postprocess_settings(cfg: EvalConfig, spec: DatasetSpec) -> PostProcess:
    """The dataset's post-processing defaults (with the backbone's reference differences,
    `BACKBONE_POSTPROCESS`) and the config's overrides."""
    family = spar.get_spec(cfg.backbone).family
    defaults = {k: getattr(spec, k) for k in ("logit_scale", "logit_bias", "prob_thd", "area_thd")}
    defaults.update(BACKBONE_POSTPROCESS.get((family, spec.name), {}))

    def pick(key: str):
        value = getattr(cfg, key)
        return defaults[key] if value is None else value

    return PostProcess(logit_scale=pick("logit_scale"), logit_bias=pick("logit_bias"), prob_thd=pick("prob_thd"),
                       area_thd=pick("area_thd"))


class Evaluator:
    """Holds the models and text classifiers of a run; scores one image in every mode.

    `single` and `sliding` share the pre-trained model (and so its cached text embeddings);
    `student` loads the checkpoint into the same architecture.
    """

    def __init__(self, cfg: EvalConfig, store: Storage):
        self.cfg, self.store = cfg, store
        self.spec = get_dataset(cfg.dataset)
        self.device = pick_device(cfg.device)
        lines = load_class_lines(class_source(self.spec.name, cfg.classes), store)
        base = None
        self.models: dict[str, spar.Backbone] = {}
        for mode in cfg.modes:
            if mode == "student":
                self.models[mode] = self._load(cfg.checkpoint)
            else:
                base = base or self._load(cfg.pretrained)
                self.models[mode] = base
        self.classifiers: dict[str, spar.TextClassifier] = {}
        for mode, bb in self.models.items():
            # the student's text tower is the teacher's (training touches the image tower only):
            # embed the classes once -- on a CPU that is minutes for a ViT-B text tower
            same = next((m for m in self.classifiers if _same_text_tower(self.models[m], bb)), None)
            self.classifiers[mode] = self.classifiers[same] if same else spar.build_classifier(bb, lines)
        n = next(iter(self.classifiers.values())).num_classes
        if n != self.spec.num_classes:
            raise ConfigError(f"the class list has {n} classes, {self.spec.name} has {self.spec.num_classes}")
        self.class_names = display_names(self.spec, next(iter(self.classifiers.values())).class_names)
        amp = AMP_DTYPES[cfg.amp_dtype]
        sliding = FeatureSettings(mode="sliding", sliding_mode=cfg.sliding_mode, stride=cfg.stride, crop=cfg.crop,
                                  window_batch=cfg.window_batch, amp_dtype=amp)
        self.settings = {m: sliding if m == "sliding" else FeatureSettings(mode="single", amp_dtype=amp)
                         for m in cfg.modes}
        self.post = postprocess_settings(cfg, self.spec)
        self.scale = tuple(cfg.scale or self.spec.scale)

    @property
    def device_name(self) -> str:
        return device_name(self.device)

    def _load(self, weights: str | None) -> spar.Backbone:
        return self.store.call("weights", weights or "", lambda: spar.load_backbone(  # fetched under the retry policy
            self.cfg.backbone, pretrained=weights, device=self.device, init_seed=self.cfg.init_seed,
            storage_options=self.store.weights_options(weights or "")))

    def warmup(self) -> None:
        """One untimed pass per mode on a window-sized image (kernel selection, allocator, lazy init)."""
        side = self.cfg.crop or next(iter(self.models.values())).window
        image = torch.zeros(side, side, 3, dtype=torch.uint8)
        for mode in self.cfg.modes:
            segment_image(self.models[mode], image, self.classifiers[mode], self.settings[mode], self.post)
        synchronize(self.device)

    def __call__(self, image: np.ndarray, label: np.ndarray) -> dict[str, tuple[np.ndarray, float]]:
        """{mode: (confusion matrix (C, C) int64, seconds of inference)} for one image."""
        img = torch.from_numpy(image)
        target = torch.from_numpy(label).to(self.device)
        out = {}
        for mode in self.cfg.modes:
            synchronize(self.device)
            t = time.perf_counter()
            seg = segment_image(self.models[mode], img, self.classifiers[mode], self.settings[mode], self.post,
                                self.scale)
            synchronize(self.device)
            seconds = time.perf_counter() - t
            cm = confusion_matrix(seg.pred, target, self.spec.num_classes)
            out[mode] = (cm.cpu().numpy(), seconds)
        return out


def _same_text_tower(a: spar.Backbone, b: spar.Backbone) -> bool:
    """Whether two backbones have identical text towers (every non-image parameter and buffer)."""
    if a is b:
        return True
    sa, sb = a.clip.state_dict(), b.clip.state_dict()
    text = [k for k in sa if not k.startswith("visual.")]
    return set(text) == {k for k in sb if not k.startswith("visual.")} and all(torch.equal(sa[k], sb[k]) for k in text)


@dataclass
class Totals:
    """Sums over the evaluated images of one mode."""

    confusion: np.ndarray
    seconds: float = 0.0
    images: int = 0
    device: str = ""
    per_image: list[float] = field(default_factory=list)  # inference seconds, in arrival order

    def add(self, cm: np.ndarray, seconds: float) -> None:
        """Count one more image."""
        self.confusion += cm.reshape(self.confusion.shape)
        self.seconds += seconds
        self.images += 1
        self.per_image.append(seconds)
