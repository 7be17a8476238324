"""spar: the SPAR model library -- backbones with a dense head, the sliding-window teacher, and
student helpers. It depends on torch and open_clip only; clusters and storage live in `pipeline`.

Names load on first use (``spar.load_backbone`` imports torch and open_clip then), so a process that
only needs a light module -- ``spar.weights`` for a URL, a Ray Train controller or a storage task --
does not pay the ~6 s of importing open_clip.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "spar.backbones": ["DEFAULT", "Backbone", "BackboneSpec", "get_spec", "list_backbones", "load_backbone",
                       "register_backbone"],
    "spar.metrics": ["confusion_matrix", "iou_per_class", "mean_iou", "segmentation_scores"],
    "spar.segment": ["FeatureSettings", "PostProcess", "Segmentation", "dense_features", "fit_size",
                     "image_logits", "postprocess", "segment_image", "sliding_window_logits"],
    "spar.student": ["DEFAULT_TRAINABLE", "export_open_clip", "feature_loss", "set_trainable",
                     "trainable_parameter_names"],
    "spar.teacher": ["CompiledWindows", "count_windows", "default_window_batch", "sliding_window_features",
                     "sliding_window_features_many", "upsample_factor", "window_starts"],
    "spar.text": ["IMAGENET_TEMPLATES", "TextClassifier", "build_classifier", "parse_class_lines"],
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [*_HOME, "__version__"]

if TYPE_CHECKING:  # what the names are, for readers and type checkers
    from spar.backbones import (DEFAULT, Backbone, BackboneSpec, get_spec, list_backbones, load_backbone,
                                register_backbone)
    from spar.metrics import confusion_matrix, iou_per_class, mean_iou, segmentation_scores
    from spar.segment import (FeatureSettings, PostProcess, Segmentation, dense_features, fit_size, image_logits,
                              postprocess, segment_image, sliding_window_logits)
    from spar.student import (DEFAULT_TRAINABLE, export_open_clip, feature_loss, set_trainable,
                              trainable_parameter_names)
    from spar.teacher import (CompiledWindows, count_windows, default_window_batch, sliding_window_features,
                              sliding_window_features_many, upsample_factor, window_starts)
    from spar.text import IMAGENET_TEMPLATES, TextClassifier, build_classifier, parse_class_lines


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'spar' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])
