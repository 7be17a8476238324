"""docs/method.md §3 augmentation: reproducible from (seed, key, view) alone, and its rules."""
import numpy as np
import pytest

from pipeline.cache.augment import AugmentConfig, apply_view, augment, plan_view
from pipeline.config import ConfigError
from pipeline.samples import synthetic_scene

CFG = AugmentConfig()


def test_reproducible_from_seed_key_view_alone():
    img = synthetic_scene(300, 400, 1)
    a, pa = augment(img, 0, "k1", 0, CFG)
    b, pb = augment(img.copy(), 0, "k1", 0, CFG)
    assert pa == pb and np.array_equal(a, b)
    others = [plan_view(300, 400, 0, "k1", 1, CFG), plan_view(300, 400, 0, "k2", 0, CFG),
              plan_view(300, 400, 1, "k1", 0, CFG)]
    assert all(o != pa for o in others)


@pytest.mark.parametrize("h,w", [(1500, 2250), (768, 1024), (300, 400), (2000, 900), (512, 512), (4000, 500)])
def test_rules_hold_for_many_views(h, w):
    branches = set()
    for i in range(200):
        p = plan_view(h, w, 0, f"key{i}", 0, CFG)
        lo, hi = CFG.ratio_range
        assert lo <= p["ratio"] <= hi
        rh, rw = p["resized"]
        top, left, ch, cw = p["crop"]
        long_t, short_t = int(2048 * p["ratio"]), int(1024 * p["ratio"])
        if p["branch"] != "upscale":  # fitted inside (long, short), aspect kept (+-1 px rounding)
            assert max(rh, rw) <= long_t + 1 and min(rh, rw) <= short_t + 1
            assert max(rh, rw) >= long_t - 1 or min(rh, rw) >= short_t - 1
            assert abs(rh / rw - h / w) < 0.02 * h / w
        assert ch % 16 == 0 and cw % 16 == 0 and min(ch, cw) >= 512
        assert 0 <= top and top + ch <= rh and 0 <= left and left + cw <= rw
        if p["branch"] == "crop":
            assert ch >= min(rh, max(512, 0.4 * rh)) - 16 and cw >= min(rw, max(512, 0.4 * rw)) - 16
        if p["branch"] == "upscale":
            assert min(rh, rw) == 512
        else:
            assert min(rh, rw) >= 512
        branches.add(p["branch"])
    if (h, w) in [(768, 1024), (512, 512), (300, 400)]:  # short side >= 512 after any fit
        assert {"full", "crop"} <= branches
    if (h, w) == (4000, 500):  # short side < 512 after any fit
        assert branches == {"upscale"}


def test_keep_and_flip_probabilities():
    plans = [plan_view(1536, 2048, 0, f"k{i}", 0, CFG) for i in range(2000)]
    full = np.mean([p["branch"] == "full" for p in plans if p["branch"] != "upscale"])
    flips = np.mean([p["flip"] for p in plans])
    assert 0.45 < full < 0.55 and 0.45 < flips < 0.55


def test_apply_view_pixels():
    img = synthetic_scene(600, 800, 2)
    plan = {"resized": [600, 800], "crop": [16, 32, 512, 528], "flip": True}
    out = apply_view(img, plan)
    assert np.array_equal(out, img[16:528, 32:560][:, ::-1]) and out.flags["C_CONTIGUOUS"]


def test_extended_variant_and_bad_settings():
    ext = AugmentConfig(scale=[2560, 2560], ratio_range=[0.2, 1.0])
    p = plan_view(1000, 1000, 0, "x", 0, ext)
    assert 0.2 <= p["ratio"] <= 1.0
    with pytest.raises(ConfigError):
        AugmentConfig(ratio_range=[1.0, 0.5])
    with pytest.raises(ConfigError):
        AugmentConfig(min_side=8, multiple=16)
