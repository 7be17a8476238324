"""Open-vocabulary segmentation from dense features (docs/method.md §5), for images of any size.

    image (H0, W0, 3) uint8
      -> optional evaluation resize (keep aspect, fit inside (long, short))       `fit_size`
      -> fit to the patch grid: crop (maskclip), pad (siglip2), stretch (dinov3txt) `fit_to_patches`
      -> dense features: single pass, or the sliding-window teacher               `dense_features`
      -> cosine logits with every synonym, upsampled to (H0, W0)                   `patch_logits`, `upsample_logits`
      -> scale + bias, softmax, best synonym per class, area_thd, argmax, prob_thd `postprocess`

The classic segmentation-style sliding window (each window's logits upsampled to the crop and
averaged per pixel, as SCLIP does) is `sliding_window_logits`; it has no feature map.

Patch remainders follow the reference: open_clip's patch embedding (a stride-p conv) drops the
right / bottom remainder, so `maskclip` crops to the floor multiple and the logits of the cropped
grid are stretched over the whole image; timm's SigLIP2 pads (``dynamic_img_pad``) to the next
multiple, so the padded logits are cut back to the image before resizing; the DINOv3.txt reference
stretches the image (bicubic) to the next multiple, so its logits cover the whole image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spar.interface import Backbone
from spar.teacher import autocast, axis_coverage, iter_window_chunks, sliding_window_features, window_starts
from spar.text import TextClassifier

MODES = ("single", "sliding")  # the student is "single" with the student's weights
SLIDING_MODES = ("feature", "logits")
_SCATTER_BUDGET = 1 << 26  # elements of upsampled window logits per index_add (256 MB in float32)


@dataclass(frozen=True)
class PostProcess:
    """Post-processing of docs/method.md §5 (the defaults are the generic benchmark settings)."""

    logit_scale: float = 40.0  # multiplies the cosine logits before the softmax
    logit_bias: float = 0.0  # added after scaling (docs/method.md §5); one shared constant cannot change a softmax
    prob_thd: float = 0.0  # pixels whose best class probability is below it become class 0
    area_thd: float | None = None  # classes with at most this share of the class >= 1 argmax area are dropped


@dataclass(frozen=True)
class FeatureSettings:
    """How dense features are obtained."""

    mode: str = "single"  # single | sliding
    sliding_mode: str = "feature"  # feature (the teacher's map, docs/method.md §2) | logits (SCLIP-style)
    stride: int = 24  # sliding stride in pixels
    crop: int | None = None  # sliding window side; default the backbone's pre-training size
    window_batch: int = 64  # windows per ViT forward
    amp_dtype: torch.dtype | None = None  # autocast dtype of the ViT (None = float32)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown feature mode {self.mode!r}; use one of {MODES}")
        if self.sliding_mode not in SLIDING_MODES:
            raise ValueError(f"unknown sliding_mode {self.sliding_mode!r}; use one of {SLIDING_MODES}")
        if self.stride < 1 or self.window_batch < 1:
            raise ValueError("stride and window_batch must be >= 1")


@dataclass(frozen=True)
class PatchFit:
    """An image fitted to the patch grid, and which part of it holds the image."""

    x: torch.Tensor  # (B, 3, H', W'), H' and W' multiples of the patch
    content: tuple[int, int]  # rows / cols of `x` that are image, not padding (== x's size when cropped)

    @property
    def padded(self) -> bool:
        """True when `x` extends beyond the image on some side."""
        return self.content != tuple(self.x.shape[-2:])


def fit_size(height: int, width: int, scale: tuple[int, int] | list[int]) -> tuple[int, int]:
    """Size that keeps the aspect ratio and fits inside (long, short) of `scale`; it may upscale.

    mmcv's rule: factor ``min(long / max(h, w), short / min(h, w))``, sides rounded half up
    (a 375 x 500 VOC image and scale (2048, 672) -> 672 x 896).
    """
    long, short = max(scale), min(scale)
    factor = min(long / max(height, width), short / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> uint8 ``(h, w, 3)``, bilinear without antialiasing (cv2's INTER_LINEAR,
    as mmseg's evaluation resize), rounded back to uint8 as the reference pipeline does."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    x = image.permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0)


def fit_to_patches(backbone: Backbone, x: torch.Tensor, min_side: int = 0) -> PatchFit:
    """Crop, pad or stretch normalised ``(B, 3, H, W)`` to patch multiples (``backbone.patch_fit``,
    see the module docstring).

    Sides shorter than one patch, or than `min_side` (the sliding window), are zero-padded
    (zero = the mean colour after normalisation) whatever the family.
    """
    p = backbone.patch_size
    pad_family = backbone.patch_fit == "pad"
    h, w = x.shape[-2:]
    if backbone.patch_fit == "stretch":  # bicubic to the next multiples, as the DINOv3.txt reference
        sh, sw = -(-h // p) * p, -(-w // p) * p
        if (sh, sw) != (h, w):
            x = F.interpolate(x, size=(sh, sw), mode="bicubic", align_corners=False)
        h, w = sh, sw

    def target(n: int) -> int:
        t = -(-n // p) * p if pad_family or n < p else n // p * p
        return max(t, -(-min_side // p) * p)

    th, tw = target(h), target(w)
    ch, cw = min(h, th), min(w, tw)
    x = x[..., :ch, :cw]
    if (th, tw) != (ch, cw):
        x = F.pad(x, (0, tw - cw, 0, th - ch))
    return PatchFit(x, (ch, cw))


@torch.no_grad()
def dense_features(backbone: Backbone, x: torch.Tensor, settings: FeatureSettings = FeatureSettings()
                   ) -> tuple[torch.Tensor, PatchFit]:
    """Dense map ``(B, h, w, D)`` float32 of normalised ``(B, 3, H, W)`` of any size, and the fit.

    ``single``: one pass. ``sliding``: the teacher of docs/method.md §2 (`spar.sliding_window_features`);
    images smaller than the window are padded up to it.
    """
    if settings.mode == "single":
        fit = fit_to_patches(backbone, x)
        with autocast(x.device, settings.amp_dtype):
            return backbone.dense(fit.x), fit
    if settings.sliding_mode != "feature":
        raise ValueError("sliding_mode='logits' has no feature map; use sliding_window_logits")
    crop = settings.crop or backbone.window
    fit = fit_to_patches(backbone, x, min_side=crop)
    feats = sliding_window_features(backbone, fit.x, crop, settings.stride, settings.window_batch,
                                    settings.amp_dtype)
    return feats, fit


def patch_logits(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every token with every synonym: ``(B, h, w, D), (S, D) -> (B, S, h, w)``."""
    f = F.normalize(features.float(), dim=-1)
    return torch.einsum("bhwd,sd->bshw", f, text.to(f.device, f.dtype))


def upsample_logits(logits: torch.Tensor, fit: PatchFit, size: tuple[int, int]) -> torch.Tensor:
    """Grid logits ``(B, S, h, w)`` -> ``(B, S, *size)``, bilinear, undoing the patch fit.

    Cropped (or exact) fits go straight to `size`, as the reference does. Padded fits are first
    brought to the padded pixel size, cut to the image, then resized to `size`.
    """
    size = tuple(size)
    if not fit.padded:
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    ch, cw = fit.content
    up = F.interpolate(logits, size=tuple(fit.x.shape[-2:]), mode="bilinear", align_corners=False)[..., :ch, :cw]
    if (ch, cw) == size:
        return up
    return F.interpolate(up, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def sliding_window_logits(backbone: Backbone, x: torch.Tensor, text: torch.Tensor,
                          settings: FeatureSettings = FeatureSettings(mode="sliding", sliding_mode="logits")
                          ) -> torch.Tensor:
    """SCLIP-style sliding window: normalised ``(B, 3, H, W)`` -> cosine logits ``(B, S, H, W)``.

    Windows start at `spar.window_starts` offsets (the same grid as mmseg's ``slide`` inference);
    a window larger than the image shrinks to it. Each window's grid logits are upsampled to the
    window and overlap-added per pixel with one ``index_add_`` per chunk, then divided by the
    per-pixel window count. `window_batch` windows share one ViT forward.
    """
    b, _, h, w = x.shape
    crop = settings.crop or backbone.window
    ch, cw = min(crop, h), min(crop, w)
    ys, xs = torch.tensor(window_starts(h, ch, settings.stride)), torch.tensor(window_starts(w, cw, settings.stride))
    tops, lefts = (t.flatten().to(x.device) for t in torch.meshgrid(ys, xs, indexing="ij"))
    s = text.shape[0]
    count = (axis_coverage(ys, ch, h)[:, None] * axis_coverage(xs, cw, w)[None, :]).to(x.device)
    dy, dx = torch.arange(ch, device=x.device), torch.arange(cw, device=x.device)
    single = FeatureSettings(mode="single", amp_dtype=settings.amp_dtype)
    sub = max(1, _SCATTER_BUDGET // (ch * cw * s))
    out = []
    for img in x:
        canvas = torch.zeros(h * w, s, device=x.device)
        for sel in iter_window_chunks(len(tops), settings.window_batch):
            rows = tops[sel][:, None] + dy  # (n, ch)
            cols = lefts[sel][:, None] + dx  # (n, cw)
            crops = img[:, rows[:, :, None], cols[:, None, :]].transpose(0, 1)
            feats, fit = dense_features(backbone, crops, single)
            logits = patch_logits(feats, text)
            for part in iter_window_chunks(logits.shape[0], sub):
                up = upsample_logits(logits[part], fit, (ch, cw))  # (m, S, ch, cw)
                flat = rows[part][:, :, None] * w + cols[part][:, None, :]  # (m, ch, cw) pixel indices
                canvas.index_add_(0, flat.flatten(), up.permute(0, 2, 3, 1).reshape(-1, s))
        out.append((canvas.view(h, w, s) / count[..., None]).permute(2, 0, 1))
    return torch.stack(out)


def postprocess(logits: torch.Tensor, classifier: TextClassifier | torch.Tensor, post: PostProcess = PostProcess(),
                num_classes: int | None = None) -> torch.Tensor:
    """Cosine logits ``(S, H, W)`` of every synonym -> class per pixel ``(H, W)`` int64 (docs/method.md §5).

    `classifier` is a `TextClassifier` or the synonym -> class index tensor (then give `num_classes`).
    Steps: ``logits * logit_scale + logit_bias``; softmax over all synonyms; each class keeps the
    probability of its best synonym; with `area_thd`, classes >= 1 whose argmax area is at most
    ``area_thd`` x the total argmax area of classes >= 1 get probability 0; argmax; pixels whose
    highest remaining probability is below `prob_thd` become class 0.
    """
    if isinstance(classifier, TextClassifier):
        owner, num_classes = classifier.synonym_to_class, classifier.num_classes
    else:
        owner = classifier
        num_classes = num_classes if num_classes is not None else int(owner.max()) + 1
    owner = owner.to(logits.device)
    if logits.ndim != 3 or logits.shape[0] != owner.numel():
        raise ValueError(f"expected ({owner.numel()}, H, W) logits, got {tuple(logits.shape)}")
    probs = (logits.float() * post.logit_scale + post.logit_bias).softmax(0)
    if owner.numel() != num_classes or not torch.equal(owner, torch.arange(num_classes, device=owner.device)):
        # probabilities are >= 0, so a zero start leaves every class at its best synonym's value
        index = owner.view(-1, 1, 1).expand_as(probs)  # a stride-0 view: no (S, H, W) index in memory
        probs = probs.new_zeros(num_classes, *probs.shape[1:]).scatter_reduce_(0, index, probs, "amax")
    if post.area_thd:
        area = torch.bincount(probs.argmax(0).flatten(), minlength=num_classes)[1:]
        keep = (area > post.area_thd * area.sum()).to(probs.dtype)
        probs[1:] *= keep[:, None, None]
    best, pred = probs.max(0)
    if post.prob_thd > 0:
        pred[best < post.prob_thd] = 0
    return pred


@dataclass
class Segmentation:
    """What `segment_image` returns."""

    pred: torch.Tensor  # (H0, W0) int64 class per pixel of the original image
    logits: torch.Tensor | None  # (S, H0, W0) cosine logits, if asked for
    features: torch.Tensor | None  # (h, w, D) dense map, if asked for (not in sliding "logits" mode)


@torch.no_grad()
def image_logits(backbone: Backbone, image: torch.Tensor, text: torch.Tensor,
                 settings: FeatureSettings = FeatureSettings(), scale: tuple[int, int] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 ``(H0, W0, 3)`` image -> (cosine logits ``(S, H0, W0)``, dense map ``(h, w, D)`` or None).

    `scale` = (long, short) applies the evaluation resize first; the logits always come back at
    the original size.
    """
    h0, w0 = image.shape[:2]
    device = next(backbone.parameters()).device
    img = image.to(device)
    if scale:
        img = resize_image(img, fit_size(h0, w0, scale))
    x = backbone.normalize(img)
    if settings.mode == "sliding" and settings.sliding_mode == "logits":
        logits = sliding_window_logits(backbone, x, text, settings)
        if tuple(logits.shape[-2:]) != (h0, w0):
            logits = F.interpolate(logits, size=(h0, w0), mode="bilinear", align_corners=False)
        return logits[0], None
    feats, fit = dense_features(backbone, x, settings)
    return upsample_logits(patch_logits(feats, text), fit, (h0, w0))[0], feats[0]


def segment_image(backbone: Backbone, image: torch.Tensor, classifier: TextClassifier,
                  settings: FeatureSettings = FeatureSettings(), post: PostProcess = PostProcess(),
                  scale: tuple[int, int] | None = None, *, keep_logits: bool = False,
                  keep_features: bool = False) -> Segmentation:
    """Segment one uint8 ``(H0, W0, 3)`` image into `classifier`'s classes at its original size."""
    logits, feats = image_logits(backbone, image, classifier.embeddings, settings, scale)
    pred = postprocess(logits, classifier, post)
    return Segmentation(pred, logits if keep_logits else None, feats if keep_features else None)
