"""spar: the SPAR model library -- backbones with a dense head, the sliding-window teacher, and
student helpers. It depends on torch and open_clip only; clusters and storage live in `pipeline`."""
from spar.backbones import (
    DEFAULT,
    Backbone,
    BackboneSpec,
    get_spec,
    list_backbones,
    load_backbone,
    register_backbone,
)
from spar.metrics import confusion_matrix, iou_per_class, mean_iou, segmentation_scores
from spar.segment import (
    FeatureSettings,
    PostProcess,
    Segmentation,
    dense_features,
    fit_size,
    image_logits,
    postprocess,
    segment_image,
    sliding_window_logits,
)
from spar.student import DEFAULT_TRAINABLE, export_open_clip, feature_loss, set_trainable, trainable_parameter_names
from spar.teacher import (
    CompiledWindows,
    count_windows,
    default_window_batch,
    sliding_window_features,
    sliding_window_features_many,
    upsample_factor,
    window_starts,
)
from spar.text import IMAGENET_TEMPLATES, TextClassifier, build_classifier, parse_class_lines

__version__ = "0.1.0"

__all__ = [
    "DEFAULT", "DEFAULT_TRAINABLE", "Backbone", "BackboneSpec", "CompiledWindows", "count_windows",
    "default_window_batch", "export_open_clip",
    "feature_loss", "get_spec", "list_backbones", "load_backbone", "register_backbone", "set_trainable",
    "sliding_window_features", "sliding_window_features_many", "trainable_parameter_names",
    "upsample_factor", "window_starts", "__version__",
    # open-vocabulary segmentation
    "IMAGENET_TEMPLATES", "FeatureSettings", "PostProcess", "Segmentation", "TextClassifier", "build_classifier",
    "confusion_matrix", "dense_features", "fit_size", "image_logits", "iou_per_class", "mean_iou",
    "parse_class_lines", "postprocess", "segment_image", "segmentation_scores", "sliding_window_logits",
]
