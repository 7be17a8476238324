"""`jobs/segment.py`: overlay PNG at the input's size with a legend, mask, features, any size, URLs."""
import functools
import http.server
import json
import threading

import numpy as np
import pytest
from PIL import Image

from jobs import segment
from pipeline.config import ConfigError, parse_config
from pipeline.evaluate.segment import SegmentConfig, class_colors, draw_legend, parse_classes
from pipeline.samples import synthetic_scene

TINY = ["backbone=maskclip-test", "pretrained=null"]


def check_overlay(overlay_path, mask_path, image: np.ndarray, summary: dict, alpha: float = 0.5):
    """The overlay is the blend of image and class colours everywhere but the legend box, and the
    legend shows a solid swatch of each present class's colour."""
    overlay = np.asarray(Image.open(overlay_path).convert("RGB"))
    mask = np.asarray(Image.open(mask_path))
    h, w = image.shape[:2]
    assert overlay.shape == (h, w, 3) and mask.shape == (h, w)
    colors = np.array([c["color"] for c in summary["classes"]], dtype=np.uint8)
    blend = (image * (1 - alpha) + colors[mask].astype(np.float32) * alpha).round().astype(np.uint8)
    differs = (overlay != blend).any(-1)
    ys, xs = np.nonzero(differs)
    assert differs.any(), "no legend drawn"
    x1, y1 = xs.max(), ys.max()
    assert not differs[y1 + 1:, :].any() and not differs[:, x1 + 1:].any()  # only the top-left box changed
    legend = overlay[: y1 + 1, : x1 + 1].reshape(-1, 3)
    present = [c for c in summary["classes"] if c["fraction"] > 0]
    assert present and sum(c["fraction"] for c in summary["classes"]) == pytest.approx(1.0)
    for c in present:  # a solid swatch: at least 8 x 8 pixels of exactly the class colour
        assert (legend == np.array(c["color"], np.uint8)).all(-1).sum() >= 64, c["name"]
    for i, c in enumerate(summary["classes"]):
        assert c["fraction"] == pytest.approx((mask == i).mean())


@pytest.mark.parametrize("name,hw,scale", [("maskclip-test", (77, 131), "null"), ("siglip2-test", (150, 97), "[160,96]")])
def test_segment_writes_an_overlay_of_the_input_size_with_a_legend(tmp_path, name, hw, scale):
    image = synthetic_scene(*hw, seed=3)
    Image.fromarray(image).save(tmp_path / "photo.png")
    summary = segment.main([f"image={tmp_path / 'photo.png'}", 'classes=sky, ground | grass | field, box, disc',
                            f"output={tmp_path / 'out'}", f"backbone={name}", "pretrained=null", f"scale={scale}",
                            "save_features=true"])
    out = tmp_path / "out"
    assert summary["overlay"] == str(out / "photo.png") and summary["size"] == list(hw)
    assert [c["name"] for c in summary["classes"]] == ["sky", "ground", "box", "disc"]
    assert summary["classes"][1]["synonyms"] == ["ground", "grass", "field"]
    check_overlay(out / "photo.png", out / "photo.mask.png", image, summary)
    feats = np.load(out / "photo.features.npy", allow_pickle=False)
    dim = 32 if name == "maskclip-test" else 64
    # maskclip crops 77x131 to 64x128 (4 x 8 tokens); siglip2 resizes 150x97 to 148x96, pads to 160x96 (10 x 6)
    assert feats.dtype == np.float32 and feats.shape == ((4, 8, dim) if name == "maskclip-test" else (10, 6, dim))
    assert json.loads((out / "photo.json").read_text())["feature_shape"] == list(feats.shape)


def test_segment_reads_urls_and_writes_to_a_png_path(tmp_path):
    image = synthetic_scene(90, 120, seed=5)
    (tmp_path / "www").mkdir()
    Image.fromarray(image).save(tmp_path / "www" / "street.jpg", quality=95)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/street.jpg"
        summary = segment.main([f"image={url}", "classes=voc21", f"output={tmp_path / 'seg.png'}", *TINY,
                                "features=sliding", "scale=[128,96]"])
    finally:
        server.shutdown()
    assert summary["overlay"] == str(tmp_path / "seg.png") and summary["features"] is None
    # the paper's VOC21 list: its background is prompted as "sky, wall, ..." and shown as background
    assert len(summary["classes"]) == 21 and summary["classes"][0]["name"] == "background"
    assert summary["classes"][0]["synonyms"][:2] == ["sky", "wall"] and summary["classes"][1]["name"] == "aeroplane"
    decoded = np.asarray(Image.open(tmp_path / "www" / "street.jpg").convert("RGB"))
    check_overlay(tmp_path / "seg.png", tmp_path / "seg.mask.png", decoded, summary)


def test_legend_lists_what_fits_and_counts_the_rest():
    pred = np.repeat(np.arange(12), 5)[None].repeat(40, 0)  # 12 classes on a 40 x 60 image
    names = [f"class{i}" for i in range(12)]
    img = Image.new("RGB", (60, 40))
    legend = draw_legend(img, pred, names, class_colors(12))
    assert legend.hidden > 0 and len(legend.entries) + legend.hidden == 12
    assert legend.box[2] < 60 and legend.box[3] < 40  # clipped to the image


def test_class_argument_forms(tmp_path):
    assert parse_classes("cat, dog | puppy ,sky") == ["cat", "dog, puppy", "sky"]
    assert parse_classes("cityscapes")[0].startswith("road")
    (tmp_path / "mine.txt").write_text("# mine\ntree, bush\nsky\n")
    assert parse_classes(str(tmp_path / "mine.txt")) == ["tree, bush", "sky"]
    with pytest.raises(ConfigError, match="empty class"):
        parse_classes("cat,,dog")


@pytest.mark.parametrize("argv,msg", [
    (["classes=cat"], "image="), (["image=x.png"], "classes="),
    (["image=x.png", "classes=cat", "features=student"], "checkpoint"),
    (["image=x.png", "classes=cat", "features=sliding", "sliding_mode=logits", "save_features=true"], "feature map"),
])
def test_segment_config_errors(argv, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_config(SegmentConfig, argv)
