"""Single-pass dense forward (docs/method.md §1) against step-by-step computations from open_clip's modules."""
import math

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F

import spar
from tests.conftest import TEST_BACKBONES


def maskclip_reference(clip, x):
    """docs/method.md §1 written out from open_clip's own modules, one step at a time."""
    v = clip.visual
    p = v.patch_size[0]
    gh, gw = x.shape[-2] // p, x.shape[-1] // p
    tok = v.conv1(x).reshape(x.shape[0], v.conv1.out_channels, -1).permute(0, 2, 1)
    tok = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), tok], dim=1)
    pos = v.positional_embedding
    n = int(math.sqrt(pos.shape[0] - 1))
    if (gh, gw) != (n, n):
        grid = pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((gh + 0.1) / n, (gw + 0.1) / n), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)])
    tok = v.ln_pre(tok + pos)
    for blk in v.transformer.resblocks[:-1]:
        tok = blk(tok)
    last = v.transformer.resblocks[-1]
    w = last.attn.embed_dim
    y = last.ln_1(tok)
    value = y @ last.attn.in_proj_weight[2 * w:].T + last.attn.in_proj_bias[2 * w:]
    tok = tok + last.attn.out_proj(value)
    tok = tok + last.mlp(last.ln_2(tok))
    out = v.ln_post(tok) @ v.proj
    return out[:, 1:].reshape(x.shape[0], gh, gw, -1)


def siglip2_reference(clip, x):
    """docs/method.md §1's SigLIP2 head on timm's *own* dynamic-size trunk (same weights)."""
    trunk = clip.visual.trunk
    dyn = timm.create_model(trunk.default_cfg["architecture"], pretrained=False, num_classes=0,
                            global_pool="map", dynamic_img_size=True, dynamic_img_pad=True,
                            img_size=trunk.patch_embed.img_size)
    dyn.load_state_dict(trunk.state_dict())
    dyn.eval()
    tok = dyn.forward_features(x)
    pool = dyn.attn_pool
    w = pool.kv.out_features // 2
    v = pool.proj(tok @ pool.kv.weight[w:].T + pool.kv.bias[w:])
    v = v + pool.mlp(pool.norm(v))
    p = 16
    return v.reshape(x.shape[0], math.ceil(x.shape[-2] / p), math.ceil(x.shape[-1] / p), -1)


def dinov3_reference(bb, x):
    """docs/method.md §1's DINOv3 map from timm's *own* model: a fresh dynamic-size Eva with the same
    weights and RoPE periods, ``forward_features`` (final norm), prefix tokens dropped."""
    trunk = bb.clip.visual
    dyn = timm.create_model(trunk.default_cfg["architecture"], pretrained=False, num_classes=0, dynamic_img_size=True)
    dyn.load_state_dict(trunk.state_dict())
    dyn.rope.periods.copy_(trunk.rope.periods)
    dyn.eval()
    tok = dyn.forward_features(x)[:, dyn.num_prefix_tokens:]
    return tok.reshape(x.shape[0], x.shape[-2] // 16, x.shape[-1] // 16, -1)


def reference(backbone, x):
    family = backbone.spec.family
    if family == "dinov3txt":
        return dinov3_reference(backbone, x)
    return maskclip_reference(backbone.clip, x) if family == "maskclip" else siglip2_reference(backbone.clip, x)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", TEST_BACKBONES)
@pytest.mark.parametrize("size", [(64, 64), (96, 160), (144, 48), (16, 16)])
def test_dense_equals_step_by_step(tiny_backbones, name, size):
    bb = tiny_backbones[name]
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        got = bb.dense(x)
        want = reference(bb, x)
    assert got.shape == (2, size[0] // 16, size[1] // 16, bb.dim)
    assert got.dtype == torch.float32
    assert rel_err(got, want) < 1e-5


@pytest.mark.slow
def test_dense_vitb16_equals_step_by_step(vitb16):
    x = torch.randn(1, 3, 224, 320)
    with torch.no_grad():
        assert rel_err(vitb16.dense(x), maskclip_reference(vitb16.clip, x)) < 1e-5


def test_pretraining_grid_is_not_resized(tiny_backbones):
    """At the pre-training resolution the positional embeddings are used as they are (no +0.1 resample)."""
    bb = tiny_backbones["maskclip-test"]
    g = bb.window // bb.patch_size
    assert bb.positional_embedding(g, g) is bb.clip.visual.positional_embedding
    resized = bb.positional_embedding(g, g + 1)
    assert resized.shape == (g * (g + 1) + 1, bb.clip.visual.positional_embedding.shape[1])


def test_dense_with_grad_matches_inference(tiny_backbones):
    """Training (autograd, SDPA) and inference (fast path off) give the same map."""
    bb = tiny_backbones["maskclip-test"]
    x = torch.randn(1, 3, 80, 96)
    with torch.no_grad():
        a = bb.dense(x)
    b = bb.dense(x.requires_grad_(True))
    assert rel_err(b.detach(), a) < 1e-5


@pytest.mark.parametrize("name", TEST_BACKBONES)
@pytest.mark.parametrize("bad", [(1, 3, 65, 64), (1, 3, 64, 70), (3, 64, 64), (1, 4, 64, 64)])
def test_dense_rejects_bad_shapes(tiny_backbones, name, bad):
    with pytest.raises(ValueError):
        tiny_backbones[name].dense(torch.randn(*bad))


@pytest.mark.parametrize("name", TEST_BACKBONES)
def test_normalize(tiny_backbones, name):
    bb = tiny_backbones[name]
    img = torch.randint(0, 256, (2, 32, 48, 3), dtype=torch.uint8)
    x = bb.normalize(img)
    assert x.shape == (2, 3, 32, 48) and x.dtype == torch.float32
    mean, std = torch.tensor(bb.mean), torch.tensor(bb.std)
    want = (img.permute(0, 3, 1, 2).float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(x, want)
    assert bb.normalize(img[0]).shape == (1, 3, 32, 48)
    with pytest.raises(TypeError):
        bb.normalize(img.float())


def test_registry_attributes():
    assert {"maskclip", "siglip2", "maskclip-test", "siglip2-test"} <= set(spar.list_backbones())
    mc, sg = spar.get_spec("maskclip"), spar.get_spec("siglip2")
    assert (mc.model_name, mc.default_pretrained, mc.window) == ("ViT-B-16", "laion2b_s34b_b88k", 224)
    assert mc.mean == (0.48145466, 0.4578275, 0.40821073) and mc.std == (0.26862954, 0.26130258, 0.27577711)
    assert (sg.model_name, sg.window, sg.mean, sg.std) == ("ViT-B-16-SigLIP2-512", 512, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="unknown backbone"):
        spar.get_spec("nope")


@pytest.mark.slow
def test_siglip2_full_size_builds_offline():
    bb = spar.load_backbone("siglip2", pretrained=None)
    assert (bb.patch_size, bb.window, bb.dim) == (16, 512, 768)
    with torch.no_grad():
        assert bb.dense(torch.randn(1, 3, 32, 48)).shape == (1, 2, 3, 768)


def test_random_init_is_reproducible():
    a = spar.load_backbone("maskclip-test", pretrained=None)
    b = spar.load_backbone("maskclip-test", pretrained=None)
    c = spar.load_backbone("maskclip-test", pretrained=None, init_seed=1)
    sa, sb, sc = a.clip.state_dict(), b.clip.state_dict(), c.clip.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["visual.conv1.weight"], sc["visual.conv1.weight"])


def test_tiny_configs_are_plain_open_clip_models():
    """Users load tiny exported students with plain open_clip once spar is imported."""
    assert "spar-test-maskclip" in open_clip.list_models()
    assert isinstance(open_clip.get_tokenizer("spar-test-sl2"), open_clip.SimpleTokenizer)
