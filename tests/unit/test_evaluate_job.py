"""`jobs/evaluate.py` end to end on tiny benchmarks (no Ray): the three-way table and its numbers."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import spar
from jobs import evaluate
from pipeline.config import ConfigError, parse_config
from pipeline.evaluate.datasets import get_dataset
from pipeline.evaluate.evaluator import EvalConfig, postprocess_settings
from pipeline.storage import Storage
from tests.segdata import make_voc

TINY = ["backbone=maskclip-test", "pretrained=null", "scale=[160,96]"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A tiny VOC tree and a student checkpoint (another random init, so student != single)."""
    root = tmp_path_factory.mktemp("bench")
    raw = make_voc(root / "voc", [(60, 80), (75, 50), (48, 100)])
    student = spar.load_backbone("maskclip-test", pretrained=None, init_seed=1)
    ckpt = spar.export_open_clip(student, root / "student.safetensors")
    return {"root": root, "voc": str(root / "voc"), "raw": raw, "checkpoint": str(ckpt)}


def recompute_miou(bb, voc_root: Path, raw: dict, settings: spar.FeatureSettings, name: str = "voc21") -> float:
    """The evaluation written independently: PIL decoding, labels mapped here, spar's segmentation."""
    spec = get_dataset(name)
    clf = spar.build_classifier(bb, (Path(spar.__file__).parents[1] / "pipeline/evaluate/classes" / f"{name}.txt").read_text())
    post = spar.PostProcess(spec.logit_scale, spec.logit_bias, spec.prob_thd, spec.area_thd)
    cm = 0
    for key, label in raw.items():
        image = np.asarray(Image.open(voc_root / "VOCdevkit/VOC2012/JPEGImages" / f"{key}.jpg").convert("RGB"))
        if spec.reduce_zero_label:
            label = np.where(label == 0, 255, np.where(label == 255, 255, label.astype(np.int64) - 1))
        seg = spar.segment_image(bb, torch.from_numpy(image.copy()), clf, settings, post, (160, 96))
        cm = cm + spar.confusion_matrix(seg.pred, torch.from_numpy(label.astype(np.int64)), spec.num_classes)
    return 100 * spar.mean_iou(cm)


def test_features_all_writes_the_three_way_table(bench, tmp_path):
    out = tmp_path / "eval"
    result = evaluate.main(["dataset=voc21", f"root={bench['voc']}", "features=all", f"checkpoint={bench['checkpoint']}",
                            f"output={out}", *TINY])
    rows = json.loads((out / "table.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["single", "sliding-feature-s24", "student"]
    md = (out / "table.md").read_text()
    for text in ("| backbone | features | VOC21 | mean | paper |", "single pass", "sliding teacher (feature, s=24)",
                 "SPAR student", "Images per second"):
        assert text in md
    assert md == result["table"]
    base = spar.load_backbone("maskclip-test", pretrained=None)
    student = spar.load_backbone("maskclip-test", pretrained=bench["checkpoint"])
    expected = {"single": recompute_miou(base, Path(bench["voc"]), bench["raw"], spar.FeatureSettings()),
                "sliding-feature-s24": recompute_miou(base, Path(bench["voc"]), bench["raw"],
                                                      spar.FeatureSettings(mode="sliding")),
                "student": recompute_miou(student, Path(bench["voc"]), bench["raw"], spar.FeatureSettings())}
    for label, miou in expected.items():
        r = json.loads((out / "maskclip-test" / "voc21" / f"{label}.json").read_text())
        assert r["miou"] == pytest.approx(miou, abs=1e-3), label
        assert r["images"] == r["images_listed"] == 3 and r["images_per_s"] > 0 and len(r["iou"]) == 21
        assert r["median_seconds_per_image"] > 0 and r["seconds"] == pytest.approx(3 / r["images_per_s"])
        assert r["postprocess"] == {"logit_scale": 65.0, "logit_bias": 0.0, "prob_thd": 0.1, "area_thd": 0.1}
        assert next(row for row in rows if row["label"] == label)["miou"]["voc21"] == r["miou"]
    assert expected["single"] != expected["student"]  # the checkpoint was really used
    assert (out / "maskclip-test" / "voc21" / "config.yaml").is_file()


def test_one_command_per_dataset_fills_the_table(bench, tmp_path):
    out = tmp_path / "eval"
    common = [f"root={bench['voc']}", f"output={out}", *TINY]
    evaluate.main(["dataset=voc21", "features=single", *common])
    evaluate.main(["dataset=voc20", "features=single", "limit=2", *common])
    evaluate.main(["dataset=voc20", "features=sliding", "sliding_mode=logits", "stride=32", *common])
    table = json.loads((out / "table.json").read_text())
    assert table["datasets"] == ["voc21", "voc20"]
    single = next(r for r in table["rows"] if r["label"] == "single")
    assert single["mean"] == pytest.approx((single["miou"]["voc21"] + single["miou"]["voc20"]) / 2)
    assert single["partial"] == ["voc20"] and single["images"] == {"voc21": 3, "voc20": 2}
    md = (out / "table.md").read_text()
    assert "sliding teacher (logits, s=32)" in md and "*" in md.split("single pass")[1].split("\n")[0]


def test_config_overrides_and_checks(bench):
    base = [f"root={bench['voc']}", "dataset=voc21"]
    cfg = parse_config(EvalConfig, [*base, "features=single", "logit_scale=30", "area_thd=0"])
    post = postprocess_settings(cfg, get_dataset("voc21"))
    assert (post.logit_scale, post.prob_thd, post.area_thd) == (30, 0.1, 0)  # prob_thd from the registry
    assert cfg.pretrained == "laion2b_s34b_b88k" and cfg.modes == ["single"]
    assert parse_config(EvalConfig, [*base, "checkpoint=x"]).modes == ["single", "sliding", "student"]
    assert parse_config(EvalConfig, [*base, "checkpoint=x", "features=student, single"]).modes == ["single", "student"]
    for argv, msg in [([*base], "checkpoint"), ([*base, "features=student"], "checkpoint"),
                      (["root=/x", "features=single"], "dataset="), (["dataset=voc21", "features=single"], "root="),
                      ([*base, "dataset=coco", "features=single"], "unknown dataset"),
                      ([*base, "features=multi"], "features"), ([*base, "features=single,slide"], "features"), ([*base, "features=single", "scale=[1]"], "scale")]:
        with pytest.raises((ConfigError, ValueError), match=msg):
            parse_config(EvalConfig, argv)


def test_bad_root_exits_non_zero(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        evaluate.main(["dataset=cityscapes", f"root={tmp_path / 'empty'}", "features=single", *TINY])
    assert e.value.code == 2


def test_unreadable_images_fail_the_run_unless_skipped(bench, tmp_path):
    import shutil

    voc = tmp_path / "voc"
    shutil.copytree(bench["voc"], voc)
    key = sorted(bench["raw"])[0]
    (voc / "VOCdevkit/VOC2012/JPEGImages" / f"{key}.jpg").write_bytes(b"\xff\xd8 truncated")
    common = ["dataset=voc21", f"root={voc}", "features=single", f"output={tmp_path / 'out'}", *TINY]
    with pytest.raises(SystemExit):  # a benchmark number over fewer images must be asked for
        evaluate.main(common)
    r = evaluate.main([*common, "skip_bad=true"])["results"]["single"]
    assert r["images"] == 2 and r["skipped"][0]["key"] == key and "not a readable image" in r["skipped"][0]["reason"]


def test_student_reuses_the_teachers_text_embeddings_when_its_text_tower_is_unchanged(bench):
    from pipeline.evaluate.evaluator import Evaluator

    cfg = parse_config(EvalConfig, ["dataset=voc20", f"root={bench['voc']}", f"checkpoint={bench['checkpoint']}",
                                    "backbone=maskclip-test", "pretrained=null"])
    ev = Evaluator(cfg, Storage())
    # the checkpoint is another random init: its text tower differs, so it has its own embeddings
    assert not torch.equal(ev.classifiers["student"].embeddings, ev.classifiers["single"].embeddings)
    assert ev.classifiers["sliding"] is ev.classifiers["single"]
    # a student trained the SPAR way (image tower only) shares them
    trained = spar.load_backbone("maskclip-test", pretrained=None)
    trained.clip.visual.proj.data.mul_(1.5)
    path = spar.export_open_clip(trained, Path(bench["root"]) / "trained.safetensors")
    cfg = parse_config(EvalConfig, ["dataset=voc20", f"root={bench['voc']}", f"checkpoint={path}",
                                    "backbone=maskclip-test", "pretrained=null"])
    ev = Evaluator(cfg, Storage())
    assert ev.classifiers["student"] is ev.classifiers["single"]
    assert not torch.equal(ev.models["student"].clip.visual.proj, ev.models["single"].clip.visual.proj)
