"""The text classifier (templates, averaging, cache) and segmentation of images of any size."""
import importlib.util

import open_clip
import pytest
import torch
import torch.nn.functional as F

import spar
from spar.segment import FeatureSettings, PatchFit, fit_to_patches, resize_image, upsample_logits
from spar.text import IMAGENET_TEMPLATES, build_classifier, get_tokenizer, parse_class_lines
from tests.conftest import TEST_BACKBONES

CLASSES = ["cat, kitten", "dog", "sky, clouds, blue sky"]


# ------------------------------------------------------------------------------------- text

def test_the_80_imagenet_templates():
    assert len(IMAGENET_TEMPLATES) == 80 == len(set(IMAGENET_TEMPLATES))
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}." and "a photo of the {}." in IMAGENET_TEMPLATES


def test_class_lines_parse_synonyms_and_skip_comments():
    assert parse_class_lines("# header\n\ncat, kitten\n dog \n") == [["cat", "kitten"], ["dog"]]
    with pytest.raises(ValueError, match="empty synonym"):
        parse_class_lines(["cat,, kitten"])
    with pytest.raises(ValueError, match="empty"):
        parse_class_lines(["# only a comment"])


@pytest.mark.parametrize("name", TEST_BACKBONES)
def test_classifier_normalises_averages_normalises(tiny_backbones, name):
    bb = tiny_backbones[name]
    spar.text.clear_cache()
    clf = build_classifier(bb, CLASSES)
    assert clf.class_names == ("cat", "dog", "sky") and clf.synonyms[1] == "kitten"
    assert clf.synonym_to_class.tolist() == [0, 0, 1, 2, 2, 2] and clf.num_classes == 3
    # by hand, one synonym at a time
    tok = open_clip.get_tokenizer(bb.model_name)
    for i, syn in enumerate(clf.synonyms):
        with torch.no_grad():
            e = F.normalize(bb.clip.encode_text(tok([t.format(syn) for t in IMAGENET_TEMPLATES])), dim=-1)
        ref = F.normalize(e.mean(0), dim=-1)
        torch.testing.assert_close(clf.embeddings[i], ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(clf.embeddings.norm(dim=-1), torch.ones(6))


def test_embeddings_are_computed_once_per_model_and_class_list(tiny_backbones, monkeypatch):
    bb = tiny_backbones["maskclip-test"]
    spar.text.clear_cache()
    calls = []
    real = bb.clip.encode_text
    monkeypatch.setattr(bb.clip, "encode_text", lambda t, *a, **k: calls.append(len(t)) or real(t, *a, **k))
    first = build_classifier(bb, CLASSES)
    n = len(calls)
    assert n >= 1 and build_classifier(bb, list(CLASSES)) is first and len(calls) == n  # cached
    other = build_classifier(bb, CLASSES[:2])  # another class list: computed
    assert len(calls) > n and other.num_classes == 2
    other_model = spar.load_backbone("maskclip-test", pretrained=None, init_seed=1)
    assert not torch.equal(build_classifier(other_model, CLASSES).embeddings, first.embeddings)


def test_long_prompts_are_truncated_to_the_context(tiny_backbones):
    long_name = " ".join(["extraordinarily"] * 60)  # far beyond the tiny towers' 32 tokens
    tok = get_tokenizer("spar-test-maskclip")
    ids = tok([IMAGENET_TEMPLATES[0].format(long_name)])
    assert ids.shape == (1, 32) and ids[0, -1] == tok.eot_token_id  # cut, and still closed by EOT
    for bb in tiny_backbones.values():
        clf = build_classifier(bb, [long_name, "dog"])
        assert clf.embeddings.shape[0] == 2 and torch.isfinite(clf.embeddings).all()


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None, reason="transformers is installed")
def test_siglip2_tokenizer_error_says_what_is_missing():
    with pytest.raises(RuntimeError, match="transformers") as e:
        get_tokenizer("ViT-B-16-SigLIP2-512")
    assert "timm/ViT-B-16-SigLIP2-512" in str(e.value)


def test_classifier_needs_a_text_tower():
    bb = spar.load_backbone("maskclip-test", pretrained=None).drop_text_tower()
    with pytest.raises(ValueError, match="text tower"):
        build_classifier(bb, CLASSES)


# ------------------------------------------------------------------------- any-size images

@pytest.mark.parametrize("hw,scale,expected", [
    ((375, 500), (2048, 672), (672, 896)),  # VOC: short side to 672 (upscaling)
    ((500, 375), (2048, 672), (896, 672)),
    ((1024, 2048), (2048, 1024), (1024, 2048)),  # Cityscapes stays
    ((512, 683), (2048, 672), (672, 896)),  # ADE: 683 * 1.3125 = 896.4 -> 896
    ((300, 3000), (2048, 672), (205, 2048)),  # the long side binds
])
def test_evaluation_resize_keeps_aspect_and_fits(hw, scale, expected):
    assert spar.fit_size(*hw, scale) == expected


def test_resize_image_is_bilinear_uint8():
    img = torch.arange(4 * 6 * 3, dtype=torch.uint8).view(4, 6, 3)
    out = resize_image(img, (8, 12))
    ref = F.interpolate(img.permute(2, 0, 1)[None].float(), size=(8, 12), mode="bilinear", align_corners=False)
    assert out.dtype == torch.uint8 and torch.equal(out, ref.round()[0].permute(1, 2, 0).to(torch.uint8))


def test_patch_fit_crops_maskclip_and_pads_siglip2(tiny_backbones):
    x = torch.randn(1, 3, 70, 100)
    crop = fit_to_patches(tiny_backbones["maskclip-test"], x)
    assert crop.x.shape[-2:] == (64, 96) and crop.content == (64, 96) and not crop.padded
    assert torch.equal(crop.x, x[..., :64, :96])
    pad = fit_to_patches(tiny_backbones["siglip2-test"], x)
    assert pad.x.shape[-2:] == (80, 112) and pad.content == (70, 100) and pad.padded
    assert torch.equal(pad.x[..., :70, :100], x) and pad.x[..., 70:, :].abs().sum() == 0
    tiny = fit_to_patches(tiny_backbones["maskclip-test"], torch.randn(1, 3, 10, 40))  # under one patch
    assert tiny.x.shape[-2:] == (16, 32) and tiny.content == (10, 32)
    window = fit_to_patches(tiny_backbones["maskclip-test"], x, min_side=80)  # sliding: at least a window
    assert window.x.shape[-2:] == (80, 96) and window.content == (70, 96)


def test_maskclip_odd_size_logits_follow_the_reference(tiny_backbones):
    """Remainder dropped by the patch embedding, grid logits stretched over the whole image."""
    bb = tiny_backbones["maskclip-test"]
    clf = build_classifier(bb, CLASSES)
    img = torch.randint(0, 256, (70, 101, 3), dtype=torch.uint8)
    logits, feats = spar.image_logits(bb, img, clf.embeddings)
    x = bb.normalize(img)[..., :64, :96]
    with torch.no_grad():
        f = F.normalize(bb.dense(x), dim=-1)
    ref = F.interpolate(torch.einsum("bhwd,sd->bshw", f, clf.embeddings), size=(70, 101), mode="bilinear",
                        align_corners=False)[0]
    assert logits.shape == (6, 70, 101) and feats.shape == (4, 6, bb.dim)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-6)


def test_siglip2_padding_is_undone(tiny_backbones):
    bb = tiny_backbones["siglip2-test"]
    clf = build_classifier(bb, CLASSES)
    img = torch.randint(0, 256, (70, 101, 3), dtype=torch.uint8)
    logits, feats = spar.image_logits(bb, img, clf.embeddings)
    x = F.pad(bb.normalize(img), (0, 11, 0, 10))  # timm's dynamic_img_pad: zeros right / bottom
    with torch.no_grad():
        f = F.normalize(bb.dense(x), dim=-1)
    grid = torch.einsum("bhwd,sd->bshw", f, clf.embeddings)
    ref = F.interpolate(grid, size=(80, 112), mode="bilinear", align_corners=False)[0, :, :70, :101]
    assert feats.shape == (5, 7, bb.dim)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-6)
    # with an evaluation resize the cut logits are then resized to the original size
    fit = PatchFit(x, (70, 101))
    torch.testing.assert_close(upsample_logits(grid, fit, (35, 50))[0],
                               F.interpolate(ref[None], size=(35, 50), mode="bilinear", align_corners=False)[0])


def naive_sclip_slide(bb, x, text, crop, stride):
    """SCLIP's forward_slide, transcribed with its Python loops: per-window logits upsampled to the
    crop, padded into an image-sized canvas, summed, divided by the window count."""
    _, _, h_img, w_img = x.shape
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    preds = torch.zeros(1, text.shape[0], h_img, w_img, dtype=torch.float64)
    count = torch.zeros(1, 1, h_img, w_img, dtype=torch.float64)
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * stride, wi * stride
            y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            win = x[:, :, y1:y2, x1:x2]
            p = bb.patch_size
            with torch.no_grad():
                f = F.normalize(bb.dense(win[..., :win.shape[2] // p * p, :win.shape[3] // p * p]), dim=-1)
            lg = F.interpolate(torch.einsum("bhwd,sd->bshw", f, text), size=win.shape[-2:], mode="bilinear",
                               align_corners=False)
            preds += F.pad(lg.double(), (x1, w_img - x2, y1, h_img - y2))
            count[:, :, y1:y2, x1:x2] += 1
    return (preds / count).float()


@pytest.mark.parametrize("hw,stride", [((100, 150), 24), ((64, 130), 16), ((50, 150), 24), ((112, 96), 40)])
def test_sliding_logits_match_sclip(tiny_backbones, hw, stride):
    bb = tiny_backbones["maskclip-test"]
    clf = build_classifier(bb, CLASSES)
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(1))
    out = spar.sliding_window_logits(bb, x, clf.embeddings,
                                     FeatureSettings(mode="sliding", sliding_mode="logits", stride=stride,
                                                     window_batch=5))
    torch.testing.assert_close(out, naive_sclip_slide(bb, x, clf.embeddings, bb.window, stride), rtol=1e-5, atol=1e-5)


def test_sliding_feature_mode_is_the_teacher(tiny_backbones):
    bb = tiny_backbones["siglip2-test"]
    x = torch.randn(1, 3, 100, 150)
    feats, fit = spar.dense_features(bb, x, FeatureSettings(mode="sliding", stride=24))
    assert fit.x.shape[-2:] == (112, 160)
    torch.testing.assert_close(feats, spar.sliding_window_features(bb, fit.x, stride=24))


@pytest.mark.parametrize("name", TEST_BACKBONES)
@pytest.mark.parametrize("settings", [FeatureSettings(), FeatureSettings(mode="sliding"),
                                      FeatureSettings(mode="sliding", sliding_mode="logits")],
                         ids=["single", "sliding-feature", "sliding-logits"])
@pytest.mark.parametrize("hw,scale", [((37, 53), None), ((70, 101), (160, 96)), ((130, 61), None)])
def test_any_image_size_segments_at_its_own_size(tiny_backbones, name, settings, hw, scale):
    bb = tiny_backbones[name]
    clf = build_classifier(bb, CLASSES)
    img = torch.randint(0, 256, (*hw, 3), dtype=torch.uint8)
    seg = spar.segment_image(bb, img, clf, settings, scale=scale, keep_logits=True)
    assert seg.pred.shape == hw and seg.logits.shape == (6, *hw)
    assert seg.pred.min() >= 0 and seg.pred.max() < 3
