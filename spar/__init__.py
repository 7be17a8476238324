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
from spar.student import DEFAULT_TRAINABLE, export_open_clip, feature_loss, set_trainable, trainable_parameter_names
from spar.teacher import (
    count_windows,
    sliding_window_features,
    sliding_window_features_many,
    upsample_factor,
    window_starts,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT", "DEFAULT_TRAINABLE", "Backbone", "BackboneSpec", "count_windows", "export_open_clip",
    "feature_loss", "get_spec", "list_backbones", "load_backbone", "register_backbone", "set_trainable",
    "sliding_window_features", "sliding_window_features_many", "trainable_parameter_names",
    "upsample_factor", "window_starts", "__version__",
]
