"""Trainable-parameter spec, feature loss and open_clip export (docs/method.md §4)."""
import open_clip
import pytest
import torch

import spar
from tests.conftest import TEST_BACKBONES


@pytest.fixture(params=TEST_BACKBONES)
def fresh(request):
    return spar.load_backbone(request.param, pretrained=None)


def _trainable(bb):
    return {n for n, p in bb.clip.named_parameters() if p.requires_grad}


def test_default_spec_is_the_last_two_blocks(fresh):
    names = spar.set_trainable(fresh)
    blocks = fresh.blocks
    want = {n for n, p in fresh.clip.named_parameters()
            if any(p is q for blk in blocks[-2:] for q in blk.parameters())}
    assert set(names) == want == _trainable(fresh)
    assert len(want) > 0


def test_each_item_selects_exactly_its_parameters(fresh):
    blk0 = fresh.blocks[0]
    params = dict(fresh.clip.named_parameters())

    def ids(names):
        return {id(params[n]) for n in names}

    assert ids(spar.trainable_parameter_names(fresh, "blk_0")) == {id(p) for p in blk0.parameters()}
    assert ids(spar.trainable_parameter_names(fresh, "mlp_0")) == {id(p) for p in blk0.mlp.parameters()}
    qkv = spar.trainable_parameter_names(fresh, "qkv_-1")
    last = f".{len(fresh.blocks) - 1}."
    if fresh.spec.family == "dinov3txt":  # timm Eva: fused weight, q and v biases (k's is fixed at 0)
        assert {n.rsplit(".", 1)[1] for n in qkv} == {"weight", "q_bias", "v_bias"} and all(last in n for n in qkv)
    else:
        assert all(("in_proj" in n or ".qkv." in n) and last in n for n in qkv) and len(qkv) == 2
    if fresh.spec.family == "dinov3txt":  # RoPE: no position parameters to train
        with pytest.raises(ValueError, match="no such parameters"):
            spar.trainable_parameter_names(fresh, "posembed")
        pos = []
    else:
        pos = spar.trainable_parameter_names(fresh, "posembed")
        assert len(pos) == 1 and params[pos[0]].ndim in (2, 3)
    patch = spar.trainable_parameter_names(fresh, "patchembed")
    assert params[patch[0]].ndim == 4
    everything = spar.trainable_parameter_names(fresh, "all")
    assert ids(everything) == {id(p) for p in fresh.vision.parameters()}
    combo = spar.set_trainable(fresh, ("posembed, " if pos else "") + "mlp_1,blk_-1")
    assert _trainable(fresh) == set(combo)
    assert set(combo) == set(pos) | set(spar.trainable_parameter_names(fresh, "mlp_1")) | set(
        spar.trainable_parameter_names(fresh, "blk_-1"))
    assert not any(n.startswith(("transformer.", "text.", "token_embedding")) for n in combo)


@pytest.mark.parametrize("bad", ["", "blk_9", "blk_x", "head", "qkv_-4"])
def test_bad_specs_are_refused(fresh, bad):
    with pytest.raises(ValueError):
        spar.trainable_parameter_names(fresh, bad)


def test_maskclip_last_block_query_key_get_no_gradient():
    bb = spar.load_backbone("maskclip-test", pretrained=None)
    spar.set_trainable(bb)
    loss = bb.dense(torch.randn(1, 3, 64, 80)).square().mean()
    loss.backward()
    attn = bb.blocks[-1].attn
    w = attn.embed_dim
    assert attn.in_proj_weight.grad[:2 * w].abs().max() == 0
    assert attn.in_proj_weight.grad[2 * w:].abs().max() > 0
    assert bb.blocks[-2].attn.in_proj_weight.grad[:w].abs().max() > 0
    assert bb.blocks[0].attn.in_proj_weight.grad is None


def test_feature_loss():
    a, b = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    assert torch.isclose(spar.feature_loss(a, b), ((a - b) ** 2).mean())
    assert spar.feature_loss(a, a, "cosine").abs() < 1e-6
    assert spar.feature_loss(a, b, "smooth_l1") > 0
    with pytest.raises(ValueError):
        spar.feature_loss(a, b[:2])
    with pytest.raises(ValueError):
        spar.feature_loss(a, b, "l7")


def test_export_round_trips_bit_exactly(fresh, tmp_path):
    spar.set_trainable(fresh)
    with torch.no_grad():  # a "trained" student: perturb the trainable blocks
        for p in fresh.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    path = spar.export_open_clip(fresh, tmp_path / "student.safetensors")
    want = fresh.open_clip_state_dict()

    if fresh.export_layout == "open_clip":
        got = open_clip.create_model(fresh.model_name, pretrained=str(path)).state_dict()
    else:  # spar's layout (docs/method.md §1): what the file holds is the backbone's own state
        from safetensors.torch import load_file

        got = load_file(str(path))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    again = spar.load_backbone(fresh.name, pretrained=str(path))
    assert again.pretrained == str(path)
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        assert torch.equal(again.dense(x), fresh.dense(x))

    with pytest.raises(ValueError, match="safetensors"):
        spar.export_open_clip(fresh, tmp_path / "student.pt")
