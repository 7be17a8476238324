"""Any timm ViT as a teacher (``backbone=timm:<name>``): spec, dense map, weights, and the refusals."""
import pytest
import timm
import torch

import spar
from pipeline.config import ConfigError, parse_config

NAME = "timm:vit_spar_test_patch16_cls"  # class token + 1 register, learned absolute position embeddings


@pytest.fixture(scope="module")
def bb():
    return spar.load_backbone(NAME, pretrained=None)


def test_spec_comes_from_the_pretrained_cfg():
    spec = spar.get_spec(NAME)
    assert (spec.window, spec.patch_size, spec.dim, spec.family, spec.has_text) == (64, 16, 32, "timm", False)
    assert spec.mean == (0.485, 0.456, 0.406) and spec.default_pretrained is None  # nothing to download
    big = spar.get_spec("timm:vit_large_patch14_dinov2.lvd142m")  # built on the meta device: no weights
    assert (big.window, big.patch_size, big.dim, big.default_pretrained) == (518, 14, 1024, "timm")
    with pytest.raises(ValueError, match="unknown timm model"):
        spar.get_spec("timm:no_such_model")


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (48, 32)])
def test_dense_is_forward_features_without_prefix_tokens(bb, size):
    """timm's own dynamic-size model (position embeddings resized as timm resizes them), final norm,
    class token and register dropped."""
    ref = timm.create_model("vit_spar_test_patch16_cls", pretrained=False, num_classes=0, dynamic_img_size=True)
    ref.load_state_dict(bb.clip.visual.state_dict())
    ref.eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        want = ref.forward_features(x)[:, 2:].reshape(2, size[0] // 16, size[1] // 16, 32)
        got = bb.dense(x)
    assert got.shape == want.shape and torch.equal(got, want)


def test_teacher_single_window_is_the_single_pass(bb):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(spar.sliding_window_features(bb, x, 64, 64), bb.dense(x), atol=1e-6)


def test_trainable_groups_and_export(bb, tmp_path):
    m = spar.load_backbone(NAME, pretrained=None)
    names = spar.set_trainable(m)
    assert names and all(n.startswith(("visual.blocks.0.", "visual.blocks.1.")) for n in names)
    assert spar.trainable_parameter_names(m, "posembed") == ["visual.pos_embed"]
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(1.0)
    path = spar.export_open_clip(m, tmp_path / "student.safetensors")
    again = spar.load_backbone(NAME, pretrained=str(path))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(again.dense(x), m.dense(x))


def test_a_plain_timm_state_dict_loads_and_a_wrong_one_is_refused(bb, tmp_path):
    torch.save(bb.clip.visual.state_dict(), tmp_path / "timm.pth")
    loaded = spar.load_backbone(NAME, pretrained=str(tmp_path / "timm.pth"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.dense(x), bb.dense(x))
    with_head = dict(bb.clip.visual.state_dict(), **{"head.weight": torch.zeros(10, bb.dim),
                                                      "head.bias": torch.zeros(10)})
    torch.save(with_head, tmp_path / "with_head.pth")  # timm checkpoints usually keep their classifier
    with torch.no_grad():
        assert torch.equal(spar.load_backbone(NAME, pretrained=str(tmp_path / "with_head.pth")).dense(x), bb.dense(x))
    partial = dict(bb.clip.visual.state_dict())
    partial.pop("norm.weight")
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing keys \['norm.weight'\]"):
        spar.load_backbone(NAME, pretrained=str(tmp_path / "partial.pth"))


def test_timm_weights_fail_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="Cannot fetch timm weights.*Offline options"):
        spar.load_backbone("timm:vit_small_patch16_224.augreg_in21k", pretrained="timm")


def test_cache_and_train_configs_take_timm_backbones():
    from pipeline.cache.job import CacheConfig
    from pipeline.train.job import TrainConfig

    cfg = parse_config(CacheConfig, [f"backbone={NAME}", "pretrained=null", "augment.min_side=64"])
    assert cfg.backbone == NAME
    with pytest.raises(ConfigError, match="augment.multiple=16 is not a multiple.*patch size 14.*augment.multiple=14"):
        parse_config(CacheConfig, ["backbone=timm:vit_small_patch14_dinov2.lvd142m", "pretrained=null",
                                   "augment.min_side=518"])
    assert parse_config(TrainConfig, ["cache=out/c", f"backbone={NAME}"]).backbone == NAME


@pytest.mark.parametrize("job", ["evaluate", "segment"])
def test_evaluate_and_segment_refuse_a_backbone_without_text(job):
    if job == "evaluate":
        from pipeline.evaluate.evaluator import EvalConfig as schema
        argv = ["dataset=ade20k", "root=/data/ade", f"backbone={NAME}", "pretrained=null"]
    else:
        from pipeline.evaluate.segment import SegmentConfig as schema
        argv = ["image=x.png", "classes=cat", f"backbone={NAME}", "pretrained=null"]
    with pytest.raises(ConfigError, match="has no text tower.*cache and train only"):
        parse_config(schema, argv)
