"""A tiny timm SigLIP-style ViT for the `siglip2-test` backbone (CI and smoke runs).

open_clip builds SigLIP2's image tower through timm by *name*, so the tiny flavour must be a
registered timm model. timm's registry reads `default_cfgs` from the defining module.
"""
from timm.models import register_model
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import _create_vision_transformer

TIMM_NAME = "vit_spar_test_patch16_sl2"

default_cfgs = generate_default_cfgs({
    TIMM_NAME: {"input_size": (3, 64, 64), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "num_classes": 0},
})


@register_model
def vit_spar_test_patch16_sl2(pretrained: bool = False, **kwargs):
    """SigLIP-shaped ViT: no class token, MAP (attention-pool) head, 64 wide, 3 blocks, 64 px input."""
    args = dict(patch_size=16, embed_dim=64, depth=3, num_heads=2, class_token=False, global_pool="map", img_size=64)
    return _create_vision_transformer(TIMM_NAME, pretrained=pretrained, **dict(args, **kwargs))
