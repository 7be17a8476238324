"""The Ray Data evaluation path on a real local cluster: the same numbers as the local path."""
import json

import spar
from jobs import evaluate
from tests.segdata import make_ade


def test_ray_actor_pool_matches_the_local_evaluation(ray_cluster, tmp_path):
    make_ade(tmp_path / "ade", [(60, 80), (75, 50), (48, 100), (64, 64), (50, 70)])
    bad = sorted((tmp_path / "ade").rglob("*.jpg"))[2]
    bad.write_bytes(b"not a jpeg")  # skipped and recorded by both paths
    ckpt = spar.export_open_clip(spar.load_backbone("maskclip-test", pretrained=None, init_seed=1),
                                 tmp_path / "student.safetensors")
    common = ["dataset=ade20k", f"root={tmp_path / 'ade'}", "features=all", f"checkpoint={ckpt}",
              "backbone=maskclip-test", "pretrained=null", "scale=[128,96]", "stride=32", "skip_bad=true"]
    local = evaluate.main([*common, f"output={tmp_path / 'local'}"])
    remote = evaluate.main([*common, f"output={tmp_path / 'ray'}", "ray=true", "num_actors=2"])
    for mode, r in local["results"].items():
        q = remote["results"][mode]
        assert q["ray"] and not r["ray"] and q["images"] == r["images"] == 4 and q["images_listed"] == 5
        assert q["iou"] == r["iou"] and q["miou"] == r["miou"] and q["pixels"] == r["pixels"]
        assert [s["key"] for s in q["skipped"]] == [bad.stem] and "not a readable image" in q["skipped"][0]["reason"]
    table = json.loads((tmp_path / "ray" / "table.json").read_text())
    assert [row["label"] for row in table["rows"]] == ["single", "sliding-feature-s32", "student"]
    assert all(row["partial"] == ["ade20k"] for row in table["rows"])  # marked: one image was skipped
