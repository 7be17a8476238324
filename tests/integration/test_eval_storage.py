"""Benchmarks, weights and results on an object store (loopback S3): every path is a URL."""
import json

from jobs import evaluate, segment
from pipeline import storage
from pipeline.storage import Storage
from tests.integration.conftest import make_bucket, put_files
from tests.segdata import make_cityscapes


def test_evaluate_and_segment_from_and_to_s3(s3_endpoint, tmp_path):
    raw = make_cityscapes(tmp_path / "city", {"bonn": [(40, 80)], "ulm": [(48, 64)]})
    bucket = f"s3://{make_bucket(s3_endpoint)}"
    put_files(f"{bucket}/cityscapes", {str(p.relative_to(tmp_path / "city")): p.read_bytes()
                                       for p in (tmp_path / "city").rglob("*.png")})
    out = f"{bucket}/eval"
    result = evaluate.main(["dataset=cityscapes", f"root={bucket}/cityscapes", "features=single",
                            "backbone=maskclip-test", "pretrained=null", "scale=[128,64]", f"output={out}"])
    r = result["results"]["single"]
    assert r["images"] == len(raw) == 2 and r["pixels"] > 0
    assert json.loads(Storage().read_text(f"{out}/maskclip-test/cityscapes/single.json"))["miou"] == r["miou"]
    assert "| Cityscapes |" in Storage().read_text(f"{out}/table.md")
    image = f"{bucket}/cityscapes/leftImg8bit/val/bonn/bonn_000000_000019_leftImg8bit.png"
    summary = segment.main([f"image={image}", "classes=cityscapes", f"output={bucket}/seg", "backbone=maskclip-test",
                            "pretrained=null"])
    assert summary["overlay"] == f"{bucket}/seg/bonn_000000_000019_leftImg8bit.png"
    assert Storage().exists(summary["overlay"]) and Storage().exists(summary["mask"])
