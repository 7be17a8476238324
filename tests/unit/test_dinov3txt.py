"""DINOv3.txt (docs/method.md §1): the architecture facts, RoPE, the official weight files, the text side."""
import math

import pytest
import torch
import torch.nn.functional as F

import spar
from spar import dinotxt
from spar.timm_backbones import DINOv3Backbone


@pytest.fixture(scope="module")
def bb():
    return spar.load_backbone("dinov3txt-test", pretrained=None, init_seed=3)


def official_backbone_state(bb, periods=None, k_bias_noise=True):
    """`bb`'s image tower written in the official DINOv3 checkpoint layout (`DinoVisionTransformer`)."""
    sd = bb.clip.visual.state_dict()
    out = {}
    for k, v in sd.items():
        if k.endswith("attn.v_bias"):
            continue
        if k.endswith("attn.q_bias"):
            base = k[: -len("q_bias")]
            q, vb = v, sd[base + "v_bias"]
            k_part = torch.randn_like(q) if k_bias_noise else torch.zeros_like(q)  # masked: never used
            out[base + "qkv.bias"] = torch.cat([q, k_part, vb])
            out[base + "qkv.bias_mask"] = torch.cat([torch.ones_like(q), torch.zeros_like(q), torch.ones_like(q)])
            continue
        out[k.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma").replace("reg_token", "storage_tokens")] = v
    out["mask_token"] = torch.zeros(1, bb.dim)
    out["rope_embed.periods"] = bb.clip.visual.rope.periods.clone() if periods is None else periods
    return out


def official_dinotxt_state(bb):
    """`bb`'s text tower in the official dino.txt layout, with the (unused) vision head and logit scale."""
    out = {"text_model." + k: v for k, v in bb.clip.text.state_dict().items()}
    out["visual_model.head.blocks.0.norm1.weight"] = torch.ones(bb.dim)
    out["visual_model.head.ln_final.weight"] = torch.ones(bb.dim)
    out["logit_scale"] = torch.tensor([math.log(1 / 0.07)])
    return out


def test_vit_l_architecture_facts():
    """The registry's dinov3txt is the issue's network: built on the meta device, no weights."""
    spec = spar.get_spec("dinov3txt")
    assert (spec.window, spec.patch_size, spec.dim, spec.mean, spec.std) == (
        384, 16, 1024, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    m = spar.load_backbone("dinov3txt", pretrained=None, device="meta")
    t = m.clip.visual
    assert (t.embed_dim, len(t.blocks), t.blocks[0].attn.num_heads) == (1024, 24, 16)
    assert t.num_prefix_tokens == 5 and t.cls_token is not None and t.reg_token.shape[1] == 4
    assert t.pos_embed is None and t.blocks[0].mlp.fc1.out_features == 4096
    assert isinstance(t.blocks[0].mlp.act, torch.nn.GELU) and t.blocks[0].gamma_1.shape == (1024,)
    assert t.blocks[0].attn.q_bias is not None and t.blocks[0].attn.k_bias is not None  # k fixed at zero
    assert t.norm.eps == 1e-5 and t.rope.periods.shape == (16,) and t.rope.rotate_half
    txt = m.clip.text
    assert isinstance(txt, dinotxt.DinoTxtTextTower) and len(txt.backbone.blocks) == 24
    blk = txt.backbone.blocks[0]
    assert (blk.heads, blk.attention.qkv.in_features, blk.attention.qkv.bias, blk.feed_forward.fc1.out_features) == (
        20, 1280, None, 5120)
    proj = txt.head.linear_projection
    assert (proj.in_features, proj.out_features, proj.bias) == (1280, 2048, None)
    assert txt.backbone.positional_embedding.shape == (77, 1280) and txt.backbone.token_embedding.num_embeddings == 49408


def test_rope_is_the_official_formula(bb):
    """Periods 100 ** (2i / (head_dim / 2)), coordinates (arange(n) + 0.5) / n on [-1, 1] per axis,
    rotate-half layout [sin(a_h), sin(a_w)] twice: computed here from the formula."""
    rope = bb.clip.visual.rope
    d = bb.dim // bb.clip.visual.blocks[0].attn.num_heads
    periods = 100.0 ** (2 * torch.arange(d // 4, dtype=torch.float32) / (d // 2))
    torch.testing.assert_close(rope.periods, periods)
    h, w = 3, 5
    ch = 2 * (torch.arange(h) + 0.5) / h - 1
    cw = 2 * (torch.arange(w) + 0.5) / w - 1
    coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), -1).reshape(h * w, 2)
    angles = (2 * math.pi * coords[:, :, None] / periods).flatten(1)  # (hw, d/2): h periods, then w
    want = torch.cat([angles.sin(), angles.sin(), angles.cos(), angles.cos()], dim=-1)
    got = rope.get_embed(shape=(h, w))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_official_layout_loads_without_missing_or_unexpected_keys(bb, tmp_path):
    periods = bb.clip.visual.rope.periods * 1.01  # the checkpoint's own periods must be the ones used
    torch.save(official_backbone_state(bb, periods), tmp_path / "dinov3_vitl16_pretrain_lvd1689m-test.pth")
    torch.save(official_dinotxt_state(bb), tmp_path / "dinov3_vitl16_dinotxt_vision_head_and_text_encoder-test.pth")
    files = f"{tmp_path}/dinov3_vitl16_pretrain_lvd1689m-test.pth,{tmp_path}/dinov3_vitl16_dinotxt_vision_head_and_text_encoder-test.pth"
    got = spar.load_backbone("dinov3txt-test", pretrained=files)  # strict: raises on any missing / unexpected key
    assert torch.equal(got.clip.visual.rope.periods, periods)
    ref = spar.load_backbone("dinov3txt-test", pretrained=None, init_seed=3)
    ref.set_rope_periods(periods)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert torch.equal(got.dense(x), ref.dense(x))
        tokens = got.clip.tokenize(["a photo of a cat."])
        assert torch.equal(got.clip.encode_text(tokens), ref.clip.encode_text(tokens))
    for k, v in ref.clip.visual.state_dict().items():
        assert torch.equal(got.clip.visual.state_dict()[k], v), k
    # order does not matter, and the text file is optional (cache and train need the image tower only)
    swapped = spar.load_backbone("dinov3txt-test", pretrained=",".join(reversed(files.split(","))))
    assert torch.equal(swapped.clip.visual.rope.periods, periods)
    alone = spar.load_backbone("dinov3txt-test", pretrained=files.split(",")[0])
    assert alone.clip.text is None
    with pytest.raises(ValueError, match="without a text tower"):
        spar.build_classifier(alone, ["cat"])


def test_the_distilled_release_layout_with_zero_biases_and_masks_loads(bb, tmp_path):
    """The released distilled ViT-B/L/H files store all-zero q/k/v biases and masks: the official
    attention adds bias * mask = 0, so they load as zero q and v biases."""
    state = official_backbone_state(bb)
    for k in [k for k in state if k.endswith("qkv.bias") or k.endswith("qkv.bias_mask")]:
        state[k] = torch.zeros_like(state[k])
    torch.save(state, tmp_path / "zero.pth")
    got = spar.load_backbone("dinov3txt-test", pretrained=str(tmp_path / "zero.pth"))
    blk = got.clip.visual.blocks[0].attn
    assert torch.count_nonzero(blk.q_bias) == 0 and torch.count_nonzero(blk.v_bias) == 0
    # a trained mask keeps q and v and drops whatever the k slot holds
    trained = official_backbone_state(bb, k_bias_noise=True)
    torch.save(trained, tmp_path / "trained.pth")
    ref = spar.load_backbone("dinov3txt-test", pretrained=str(tmp_path / "trained.pth")).clip.visual.blocks[0].attn
    assert torch.equal(ref.q_bias, bb.clip.visual.blocks[0].attn.q_bias)


def test_low_precision_keeps_rope_float32_with_the_checkpoint_periods(bb):
    m = spar.load_backbone("dinov3txt-test", pretrained=None, init_seed=3)
    periods = m.clip.visual.rope.periods * 0.99
    m.set_rope_periods(periods)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = m.dense(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = m.dense(x)
        m.to(torch.bfloat16)
        assert m.clip.visual.rope.periods.dtype == torch.float32 and torch.equal(m.clip.visual.rope.periods, periods)
        half = m.dense(x)
    for got in (amp, half):
        assert got.dtype == torch.float32 and ((got - want).norm() / want.norm()) < 0.05


@pytest.mark.parametrize("corrupt,msg", [
    (lambda s: s.pop("blocks.1.ls2.gamma"), "missing keys.*blocks.1.gamma_2"),
    (lambda s: s.__setitem__("blocks.0.attn.extra.weight", torch.zeros(2)), "unexpected keys.*blocks.0.attn.extra"),
    (lambda s: s["blocks.0.attn.qkv.bias_mask"].fill_(1), "non-zero k part"),  # the k bias would count
    (lambda s: s["blocks.0.attn.qkv.bias_mask"].fill_(float("nan")), "non-finite"),
])
def test_a_damaged_official_file_is_refused_naming_keys(bb, tmp_path, corrupt, msg):
    state = official_backbone_state(bb)
    corrupt(state)
    torch.save(state, tmp_path / "b.pth")
    with pytest.raises(ValueError, match=msg):
        spar.load_backbone("dinov3txt-test", pretrained=str(tmp_path / "b.pth"))


def test_a_wrong_file_is_refused_naming_its_keys(tmp_path):
    mc = spar.load_backbone("maskclip-test", pretrained=None)
    torch.save(mc.clip.state_dict(), tmp_path / "open_clip.pth")
    with pytest.raises(ValueError, match=r"keys: ln_final.bias.*not a dinov3txt-test weights file.*storage_tokens"):
        spar.load_backbone("dinov3txt-test", pretrained=str(tmp_path / "open_clip.pth"))


def test_wrong_dinotxt_and_duplicate_towers_are_refused(bb, tmp_path):
    torch.save(official_backbone_state(bb), tmp_path / "b.pth")
    bad = official_dinotxt_state(bb)
    bad["something_else"] = torch.zeros(1)
    torch.save(bad, tmp_path / "t.pth")
    with pytest.raises(ValueError, match="something_else"):
        spar.load_backbone("dinov3txt-test", pretrained=f"{tmp_path}/b.pth,{tmp_path}/t.pth")
    wrong_text = official_dinotxt_state(bb)
    wrong_text.pop("text_model.backbone.ln_final.bias")
    torch.save(wrong_text, tmp_path / "t2.pth")
    with pytest.raises(ValueError, match="missing keys.*backbone.ln_final.bias"):
        spar.load_backbone("dinov3txt-test", pretrained=f"{tmp_path}/b.pth,{tmp_path}/t2.pth")
    with pytest.raises(ValueError, match="two files give the image tower"):
        spar.load_backbone("dinov3txt-test", pretrained=f"{tmp_path}/b.pth,{tmp_path}/b.pth")
    with pytest.raises(ValueError, match="holds no image tower"):
        torch.save(official_dinotxt_state(bb), tmp_path / "t.pth")
        spar.load_backbone("dinov3txt-test", pretrained=f"{tmp_path}/t.pth")


def test_pickles_are_never_loaded(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"storage_tokens": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights-only"):
        spar.load_backbone("dinov3txt-test", pretrained=str(tmp_path / "evil.pth"))


def test_default_weights_say_where_to_get_them():
    with pytest.raises(FileNotFoundError, match="gated by the DINOv3 licence.*dinov3_vitl16_pretrain_lvd1689m"):
        spar.load_backbone("dinov3txt")
    from spar.weights import weights_identity

    with pytest.raises(FileNotFoundError, match="dinov3_vitl16_dinotxt"):
        weights_identity("vit_large_patch16_dinov3_qkvb", "default")


def test_export_round_trips_both_towers(bb, tmp_path):
    m = spar.load_backbone("dinov3txt-test", pretrained=None, init_seed=3)
    m.set_rope_periods(m.clip.visual.rope.periods * 1.02)
    path = spar.export_open_clip(m, tmp_path / "student.safetensors")
    again = spar.load_backbone("dinov3txt-test", pretrained=str(path))
    assert torch.equal(again.clip.visual.rope.periods, m.clip.visual.rope.periods)
    x = torch.randn(1, 3, 48, 96)
    tokens = m.clip.tokenize(["a cat", "a dog"])
    with torch.no_grad():
        assert torch.equal(again.dense(x), m.dense(x))
        assert torch.equal(again.clip.encode_text(tokens), m.clip.encode_text(tokens))
    # a student exported without the text tower takes it from the dino.txt file given beside it
    m.drop_text_tower()
    vision = spar.export_open_clip(m, tmp_path / "vision.safetensors")
    torch.save(official_dinotxt_state(bb), tmp_path / "dinotxt.pth")
    both = spar.load_backbone("dinov3txt-test", pretrained=f"{vision},{tmp_path}/dinotxt.pth")
    with torch.no_grad():
        assert torch.equal(both.dense(x), again.dense(x))
        assert torch.equal(both.clip.encode_text(tokens), bb.clip.encode_text(tokens))


def test_rope_rescale_is_off_by_default_and_per_block_when_on():
    m = spar.load_backbone("dinov3txt-test", pretrained=None)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = m.dense(x)
        m.train()  # the reference trains without rescaling (see DINOv3Backbone)
        assert torch.equal(m.dense(x), want)
        m.set_rope_rescale(2.0)
        calls = []
        rope = m.clip.visual.rope
        original = rope.get_embed
        rope.get_embed = lambda *a, **k: calls.append(1) or original(*a, **k)
        a, b = m.dense(x), m.dense(x)
        assert len(calls) == 2 * len(m.blocks)  # one draw per block, as the official code
        assert not torch.equal(a, b) and not torch.equal(a, want)
        m.eval()  # never in eval mode
        assert torch.equal(m.dense(x), want)
    with pytest.raises(ValueError):
        m.set_rope_rescale(0.5)
    with pytest.raises(ValueError, match="has no RoPE"):
        spar.load_backbone("maskclip-test", pretrained=None).set_rope_rescale(2.0)


def test_grad_checkpointing_gives_the_same_map_and_gradients():
    m = spar.load_backbone("dinov3txt-test", pretrained=None)
    spar.set_trainable(m)
    x = torch.randn(1, 3, 64, 80)
    m.dense(x).square().mean().backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m.dense(x).square().mean().backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[n])


def test_text_tower_is_causal_and_pools_the_end_of_text_token(bb):
    tok = bb.clip.tokenize(["a photo of a cat."])
    eot = int(tok.argmax())
    later = tok.clone()
    later[0, eot + 1:] = 123  # tokens after the end of text cannot change a causal model's EOT state
    with torch.no_grad():
        a, b = bb.clip.text(tok), bb.clip.text(later)
        torch.testing.assert_close(a, b)
        assert a.shape == (1, 64)
        assert torch.equal(bb.clip.encode_text(tok), a[:, 32:])  # the patch-aligned half


def test_classifier_uses_the_patch_half_normalised_averaged_normalised(bb):
    clf = spar.build_classifier(bb, ["cat, kitty", "sky"], templates=("a {}.", "a photo of a {}."))
    with torch.no_grad():
        emb = bb.clip.text(bb.clip.tokenize(["a cat.", "a photo of a cat."]))[:, 32:]
    want = F.normalize(F.normalize(emb, dim=-1).mean(0), dim=0)
    torch.testing.assert_close(clf.embeddings[0], want)
    assert clf.embeddings.shape == (3, 32)


def test_tokenizer_is_clips_bpe(bb):
    import open_clip

    ref = open_clip.get_tokenizer("ViT-B-16")(["a photo of a cat.", "x " * 100])
    assert torch.equal(bb.clip.tokenize(["a photo of a cat.", "x " * 100]), ref)
    assert ref.shape == (2, 77) and ref[1, -1] == 49407  # truncated prompts keep their EOT


def test_images_are_stretched_to_patch_multiples(bb):
    from spar.segment import fit_to_patches

    x = torch.randn(1, 3, 70, 101)
    fit = fit_to_patches(bb, x)
    want = F.interpolate(x, size=(80, 112), mode="bicubic", align_corners=False)
    assert torch.equal(fit.x, want) and not fit.padded
    assert fit_to_patches(bb, torch.randn(1, 3, 64, 48)).x.shape[-2:] == (64, 48)


def test_dinov3_backbone_class():
    assert isinstance(spar.load_backbone("dinov3txt-test", pretrained=None), DINOv3Backbone)


# -- the jobs' side ------------------------------------------------------------------------------

def test_two_files_travel_as_one_pretrained_value(tmp_path, monkeypatch):
    from pipeline.config import resolve_weights
    from spar.weights import weights_identity

    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()
    (tmp_path / "w/b.pth").write_bytes(b"backbone")
    (tmp_path / "w/t.pth").write_bytes(b"text")
    value = resolve_weights("w/b.pth, w/t.pth")
    assert value == f"{tmp_path}/w/b.pth,{tmp_path}/w/t.pth"
    assert resolve_weights("s3://bucket/b.pth,w/t.pth") == f"s3://bucket/b.pth,{tmp_path}/w/t.pth"
    ident = weights_identity("vit_large_patch16_dinov3_qkvb", value)
    assert ident["kind"] == "file" and ident["value"].count("sha256:") == 2
    assert weights_identity("vit_large_patch16_dinov3_qkvb", f"{tmp_path}/w/t.pth,{tmp_path}/w/b.pth") == ident


def test_dinov3txt_evaluation_settings():
    """docs/method.md §5: logit scale 65 on VOC21 without thresholds, 50 with prob_thd 0.1 on
    Context60, 40 elsewhere (the reference's dinov3txt configs)."""
    from pipeline.config import parse_config
    from pipeline.evaluate.datasets import get_dataset
    from pipeline.evaluate.evaluator import EvalConfig, postprocess_settings

    def post(dataset, backbone="dinov3txt-test"):
        cfg = parse_config(EvalConfig, [f"dataset={dataset}", "root=/d", f"backbone={backbone}", "pretrained=null",
                                       "features=single"])
        return postprocess_settings(cfg, get_dataset(dataset))

    assert vars(post("voc21")) == {"logit_scale": 65.0, "logit_bias": 0.0, "prob_thd": 0.0, "area_thd": None}
    assert (post("context60").logit_scale, post("context60").prob_thd) == (50.0, 0.1)
    assert post("ade20k").logit_scale == 40.0 and post("cityscapes").logit_scale == 40.0
    assert post("voc21", "maskclip-test").area_thd == 0.1  # other backbones keep the dataset's defaults


def test_jobs_refuse_dinov3txt_without_weight_files():
    from pipeline.config import ConfigError, parse_config
    from pipeline.evaluate.evaluator import EvalConfig
    from pipeline.evaluate.segment import SegmentConfig

    with pytest.raises(ConfigError, match="gated by the DINOv3 licence"):
        parse_config(EvalConfig, ["dataset=voc21", "root=/d", "backbone=dinov3txt", "features=single"])
    with pytest.raises(ConfigError, match="gated by the DINOv3 licence"):
        parse_config(SegmentConfig, ["image=x.png", "classes=cat", "backbone=dinov3txt"])
    # the student alone needs no pre-trained weights
    parse_config(SegmentConfig, ["image=x.png", "classes=cat", "backbone=dinov3txt", "checkpoint=s3://b/s.safetensors"])


def test_train_config_rope_rescale():
    from pipeline.config import ConfigError, parse_config
    from pipeline.train.job import TrainConfig

    assert parse_config(TrainConfig, ["cache=out/c"]).rope_rescale is None  # the reference: no rescaling
    assert parse_config(TrainConfig, ["cache=out/c", "rope_rescale=2"]).rope_rescale == 2.0
    with pytest.raises(ConfigError, match="rope_rescale"):
        parse_config(TrainConfig, ["cache=out/c", "rope_rescale=0.5"])


def test_plan_prices_the_vit_l_window():
    """What jobs/plan.py counts for backbone=dinov3txt: a 384 window of ViT-L is ~385 GFLOP (on a
    meta-device model); a 1024 x 2048 image at stride 24 is 1,988 windows, ~0.77 PFLOP."""
    from pipeline.plan import window_flops

    bb = spar.load_backbone("dinov3txt", pretrained=None, device="meta")
    per_window = window_flops(bb, 384)
    windows = spar.count_windows(1024, 2048, 384, 24)
    assert windows == 1988
    assert 370e9 < per_window < 400e9
    assert 0.73e15 < per_window * windows < 0.8e15
