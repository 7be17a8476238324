"""The DINOv3.txt path end to end on a real local Ray cluster, with the user's two weight files in the
official layout (tiny dinov3txt-test): cache -> train -> export -> segment -> evaluate. And a timm
ViT as a teacher (timm:<name>): cache and train work, evaluation is refused before any work."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

import spar
from jobs import cache_teacher, evaluate, segment, train_student
from pipeline import open_cache
from pipeline.codecs import load_npy
from tests.images import good_images
from tests.integration.conftest import put_files
from tests.segdata import make_ade
from tests.unit.test_dinov3txt import official_backbone_state, official_dinotxt_state

SMALL = ["augment.scale=[224,160]", "augment.min_side=64", "shard_size=3", "teacher.batch_images=2"]
TRAIN = ["epochs=1", "data.loader_workers=1", "scaling.cpus_per_worker=0.5", "log_every=1"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The two files a user downloads from Meta, in their official key layout."""
    root = tmp_path_factory.mktemp("weights")
    bb = spar.load_backbone("dinov3txt-test", pretrained=None, init_seed=5)
    torch.save(official_backbone_state(bb, bb.clip.visual.rope.periods * 1.01),
               root / "dinov3_vitl16_pretrain_lvd1689m-tiny.pth")
    torch.save(official_dinotxt_state(bb), root / "dinov3_vitl16_dinotxt_vision_head_and_text_encoder-tiny.pth")
    return (f"{root}/dinov3_vitl16_pretrain_lvd1689m-tiny.pth,"
            f"{root}/dinov3_vitl16_dinotxt_vision_head_and_text_encoder-tiny.pth")


@pytest.mark.slow
def test_cache_train_export_segment_evaluate(ray_cluster, tmp_path, weights):
    src, cache, runs = tmp_path / "src", tmp_path / "cache", tmp_path / "runs"
    put_files(str(src), good_images(4, seed=7))
    cache_teacher.main(["backbone=dinov3txt-test", f"pretrained={weights}", f"source={src}", f"output={cache}", *SMALL])
    fp = open_cache(str(cache)).fingerprint
    assert fp["backbone"] == "dinov3txt-test" and fp["dim"] == 32 and fp["crop"] == 64
    assert fp["normalization"]["mean"] == [0.485, 0.456, 0.406] and fp["weights"]["value"].count("sha256:") == 2

    train_student.main([f"cache={cache}", f"output={runs}", "name=d3", *TRAIN])
    run = runs / "d3"
    info = json.loads((run / "student.json").read_text())
    assert info["backbone"] == "dinov3txt-test" and info["probe_max_abs_diff"] < 1e-5
    student = run / "student.safetensors"
    with safe_open(str(student), "pt") as f:  # spar's layout: both towers, and the checkpoint's RoPE periods
        assert f.metadata()["layout"] == "spar-timm/1"
        keys = set(f.keys())
    assert "visual.rope.periods" in keys and any(k.startswith("text.") for k in keys)
    teacher = spar.load_backbone("dinov3txt-test", pretrained=weights)
    loaded = spar.load_backbone("dinov3txt-test", pretrained=str(student))
    probe = next(s for s in open_cache(str(cache)) if s["key"] == info["probe_key"])
    with torch.no_grad():
        x = loaded.normalize(torch.from_numpy(probe["image"]))
        ours = loaded.dense(x).numpy()
        assert not torch.equal(loaded.clip.visual.blocks[-1].attn.qkv.weight, teacher.clip.visual.blocks[-1].attn.qkv.weight)
        assert torch.equal(loaded.clip.visual.blocks[0].attn.qkv.weight, teacher.clip.visual.blocks[0].attn.qkv.weight)
    assert np.abs(ours - load_npy((run / "probe_features.npy").read_bytes())).max() < 1e-5

    out = tmp_path / "seg"
    summary = segment.main(["image=builtin://photo/grace_hopper.jpg", "classes=person, flag, wall",
                            "backbone=dinov3txt-test", f"checkpoint={student}", f"output={out}", "scale=[160,96]",
                            "save_features=true"])
    assert (out / "grace_hopper.png").is_file() and (out / "grace_hopper.mask.png").is_file()
    assert summary["feature_shape"][-1] == 32 and len(summary["classes"]) == 3

    make_ade(tmp_path / "ade", [(96, 128), (120, 90)])
    result = evaluate.main(["dataset=ade20k", f"root={tmp_path / 'ade' / 'ADEChallengeData2016'}",
                            "backbone=dinov3txt-test", f"pretrained={weights}", "features=single,student",
                            f"checkpoint={student}", "scale=[160,96]", f"output={tmp_path / 'eval'}"])
    assert set(result["results"]) == {"single", "student"}
    assert all(r["images"] == 2 for r in result["results"].values())


def test_a_timm_teacher_caches_and_trains_and_is_refused_for_evaluation(ray_cluster, tmp_path):
    src, cache, runs = tmp_path / "src", tmp_path / "cache", tmp_path / "runs"
    put_files(str(src), good_images(3, seed=11))
    name = "timm:vit_spar_test_patch16_cls"
    cache_teacher.main([f"backbone={name}", "pretrained=null", f"source={src}", f"output={cache}", *SMALL])
    assert open_cache(str(cache)).fingerprint["backbone"] == name
    train_student.main([f"cache={cache}", f"output={runs}", "name=t", *TRAIN])
    student = runs / "t" / "student.safetensors"
    assert json.loads((runs / "t" / "student.json").read_text())["probe_max_abs_diff"] < 1e-5
    spar.load_backbone(name, pretrained=str(student))
    with pytest.raises(SystemExit, match="has no text tower"):
        evaluate.main(["dataset=ade20k", f"root={tmp_path}", f"backbone={name}", "pretrained=null",
                       "features=student", f"checkpoint={student}"])
    with pytest.raises(SystemExit, match="has no text tower"):
        segment.main(["image=builtin://photo/grace_hopper.jpg", "classes=cat", f"backbone={name}",
                      f"checkpoint={student}"])
