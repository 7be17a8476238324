"""Tiny timm ViTs for the test flavours (CI and smoke runs), registered with timm by name.

* ``vit_spar_test_patch16_sl2``     SigLIP-shaped (no class token, MAP head): `siglip2-test`'s trunk.
  open_clip builds SigLIP2's image tower through timm by *name*, so it must be a registered model.
* ``vit_spar_test_patch16_dinov3``  DINOv3-shaped Eva (class token, 4 registers, LayerScale, 2-D RoPE
  base 100 in the rotate-half layout, q/v bias with k fixed at 0, no absolute position embedding):
  `dinov3txt-test`'s image tower, the same class and options as ``vit_large_patch16_dinov3_qkvb``.
* ``vit_spar_test_patch16_cls``     a plain ViT with a class token, one register and learned absolute
  position embeddings: the tiny model the tests run as ``timm:vit_spar_test_patch16_cls``.

timm's registry reads `default_cfgs` from the defining module.
"""
from functools import partial

from timm.layers import LayerNorm
from timm.models import register_model
from timm.models._registry import generate_default_cfgs
from timm.models.eva import _create_eva
from timm.models.vision_transformer import _create_vision_transformer

TIMM_NAME = "vit_spar_test_patch16_sl2"
DINOV3_NAME = "vit_spar_test_patch16_dinov3"
CLS_NAME = "vit_spar_test_patch16_cls"

_IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}

default_cfgs = generate_default_cfgs({
    TIMM_NAME: {"input_size": (3, 64, 64), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "num_classes": 0},
    DINOV3_NAME: {"input_size": (3, 64, 64), "num_classes": 0, **_IMAGENET},
    CLS_NAME: {"input_size": (3, 64, 64), "num_classes": 0, **_IMAGENET},
})


@register_model
def vit_spar_test_patch16_sl2(pretrained: bool = False, **kwargs):
    """SigLIP-shaped ViT: no class token, MAP (attention-pool) head, 64 wide, 3 blocks, 64 px input."""
    args = dict(patch_size=16, embed_dim=64, depth=3, num_heads=2, class_token=False, global_pool="map", img_size=64)
    return _create_vision_transformer(TIMM_NAME, pretrained=pretrained, **dict(args, **kwargs))


@register_model
def vit_spar_test_patch16_dinov3(pretrained: bool = False, **kwargs):
    """DINOv3-shaped Eva, 32 wide (2 heads of 16: 4 RoPE periods per axis), 3 blocks, 64 px input.
    LayerScale starts at 0.5 rather than DINOv3's 1e-5, so that random blocks change the tokens."""
    args = dict(patch_size=16, img_size=64, dynamic_img_size=True, embed_dim=32, depth=3, num_heads=2,
                qkv_bias=True, init_values=0.5, rope_type="dinov3", rope_temperature=100, use_rot_pos_emb=True,
                use_abs_pos_emb=False, rope_rotate_half=True, num_reg_tokens=4, use_fc_norm=False,
                norm_layer=partial(LayerNorm, eps=1e-5), num_classes=0)
    return _create_eva(DINOV3_NAME, pretrained=pretrained, **dict(args, **kwargs))


@register_model
def vit_spar_test_patch16_cls(pretrained: bool = False, **kwargs):
    """Plain ViT with a class token and one register, learned position embeddings, 32 wide, 2 blocks."""
    args = dict(patch_size=16, embed_dim=32, depth=2, num_heads=2, reg_tokens=1, img_size=64, num_classes=0)
    return _create_vision_transformer(CLS_NAME, pretrained=pretrained, **dict(args, **kwargs))
