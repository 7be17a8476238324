"""Semantic-segmentation metrics from a confusion matrix (mmseg's definitions).

Rows of the confusion matrix are ground-truth classes, columns predicted classes. Pixels whose
ground truth is the ignore index (255) are not counted, whatever was predicted there. A class
that is absent from both the ground truth and the predictions of the whole evaluation has no
IoU (NaN) and is left out of the mean; a class that is predicted but never present scores 0.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = 255


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``(C, C)`` int64 counts of (ground truth, prediction) pairs over the non-ignored pixels.

    Args:
        pred: predicted class per pixel, any integer dtype, values in ``0..C-1``.
        target: ground truth of the same shape, values in ``0..C-1`` or `ignore_index`.
    Raises ValueError on a shape mismatch or a value outside those ranges (a wrong label mapping
    must not pass silently as "ignored").
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(target.shape)} differ in shape")
    pred = pred.reshape(-1).long()
    target = target.to(pred.device).reshape(-1).long()
    valid = target != ignore_index
    t, p = target[valid], pred[valid]
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"ground truth holds labels {lo}..{hi}, outside 0..{num_classes - 1} and {ignore_index}")
        lo, hi = int(p.min()), int(p.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"prediction holds labels {lo}..{hi}, outside 0..{num_classes - 1}")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(num_classes, num_classes)


def iou_per_class(cm: torch.Tensor) -> torch.Tensor:
    """IoU of every class as float64: TP / (TP + FP + FN); NaN where the class is in neither."""
    cm = cm.double()
    tp = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - tp
    return tp / union  # 0/0 -> NaN: absent classes drop out of the mean


def mean_iou(cm: torch.Tensor) -> float:
    """Mean IoU over the classes that appear in the ground truth or the predictions (a fraction)."""
    return float(iou_per_class(cm).nanmean())


def segmentation_scores(cm: torch.Tensor, class_names: list[str] | tuple[str, ...] | None = None) -> dict:
    """mIoU, pixel accuracy (aAcc), mean class accuracy (mAcc) and per-class IoU, in percent.

    Per-class values are ``None`` where undefined (JSON has no NaN).
    """
    cm = cm.double().cpu()
    iou = iou_per_class(cm)
    acc = cm.diagonal() / cm.sum(1)
    names = list(class_names) if class_names is not None else [str(i) for i in range(cm.shape[0])]
    if len(names) != cm.shape[0]:
        raise ValueError(f"{len(names)} class names for a {cm.shape[0]}-class confusion matrix")
    total = float(cm.sum())

    def pct(v: torch.Tensor) -> float | None:
        return None if torch.isnan(v) else round(100 * float(v), 4)

    return {
        "miou": pct(iou.nanmean()),
        "aacc": pct(cm.diagonal().sum() / total) if total else None,
        "macc": pct(acc.nanmean()),
        "iou": {n: pct(v) for n, v in zip(names, iou)},
        "pixels": int(total),
    }
