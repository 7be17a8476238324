"""The sliding-window teacher (docs/method.md §2) against a deliberately naive per-window loop."""
import pytest
import torch
import torch.nn.functional as F

import spar
from spar.teacher import _Layout
from tests.conftest import TEST_BACKBONES


def naive_teacher(bb, x, crop, stride):
    """docs/method.md §2 as plainly as possible: one window at a time, Python loops everywhere."""
    p = bb.patch_size
    r = next(r for r in range(1, p + 1) if p % r == 0 and stride % (p // r) == 0)
    cell = p // r
    _, _, H, W = x.shape

    def starts(size):
        s = list(range(0, size - crop + 1, stride))
        return s if s[-1] == size - crop else s + [size - crop]

    canvas = torch.zeros(x.shape[0], bb.dim, H // cell, W // cell, dtype=torch.float64)
    count = torch.zeros(1, 1, H // cell, W // cell, dtype=torch.float64)
    for top in starts(H):
        for left in starts(W):
            m = bb.dense(x[:, :, top:top + crop, left:left + crop]).permute(0, 3, 1, 2)
            if r > 1:
                m = F.interpolate(m, scale_factor=r, mode="bilinear", align_corners=False)
            k = crop // cell
            canvas[:, :, top // cell:top // cell + k, left // cell:left // cell + k] += m.double()
            count[:, :, top // cell:top // cell + k, left // cell:left // cell + k] += 1
    avg = (canvas / count.clamp(min=1)).float()
    avg = F.interpolate(avg, size=(H // p, W // p), mode="bilinear", align_corners=False)
    return avg.permute(0, 2, 3, 1)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# (H, W, stride) for the 64-px tiny windows: square / non-square; (side - crop) % stride == 0 or not;
# strides multiple of the patch (16, 48), not (24, 40), and == crop.
TINY_CASES = [
    (64, 64, 24), (112, 112, 24), (128, 160, 24), (96, 208, 16), (160, 96, 40),
    (176, 128, 48), (128, 192, 64), (144, 80, 8), (64, 176, 24),
]


@pytest.mark.parametrize("name", TEST_BACKBONES)
@pytest.mark.parametrize("h,w,stride", TINY_CASES)
def test_teacher_equals_naive_loop(tiny_backbones, name, h, w, stride):
    bb = tiny_backbones[name]
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        got = spar.sliding_window_features(bb, x, stride=stride, window_batch=5)
        want = naive_teacher(bb, x, bb.window, stride)
    assert got.shape == (2, h // 16, w // 16, bb.dim) and got.dtype == torch.float32
    assert rel_err(got, want) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("h,w,stride", [(224, 224, 24), (256, 288, 112), (240, 336, 24), (256, 288, 224), (224, 272, 16)])
def test_teacher_equals_naive_loop_vitb16(vitb16, h, w, stride):
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        got = spar.sliding_window_features(vitb16, x, stride=stride, window_batch=16)
        want = naive_teacher(vitb16, x, 224, stride)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("name", TEST_BACKBONES)
def test_stride_equal_to_crop_tiles_single_windows(tiny_backbones, name):
    bb = tiny_backbones[name]
    x = torch.randn(1, 3, 128, 192)
    with torch.no_grad():
        got = spar.sliding_window_features(bb, x, stride=64)
        for i in range(2):
            for j in range(3):
                tile = bb.dense(x[:, :, 64 * i:64 * (i + 1), 64 * j:64 * (j + 1)])
                torch.testing.assert_close(got[:, 4 * i:4 * (i + 1), 4 * j:4 * (j + 1)], tile, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size,crop,stride", [(1024, 224, 24), (2048, 224, 24), (100, 64, 7), (64, 64, 24), (500, 224, 112)])
def test_window_starts_cover_every_pixel(size, crop, stride):
    starts = spar.window_starts(size, crop, stride)
    assert starts[0] == 0 and starts[-1] == size - crop
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))
    covered = torch.zeros(size, dtype=torch.bool)
    for s in starts:
        covered[s:s + crop] = True
    assert covered.all()


@pytest.mark.parametrize("h,w,stride", [(1024, 2048, 24), (512, 736, 16), (320, 224, 112), (224, 224, 7)])
def test_every_output_token_is_covered(h, w, stride):
    p, crop = 16, 224
    r = spar.upsample_factor(p, stride)
    layout = _Layout.build([(h, w)], crop, stride, p // r, "cpu")
    assert layout.coverage[0].min() >= 1
    assert layout.num_windows == spar.count_windows(h, w, crop, stride)


def test_paper_window_count():
    assert spar.count_windows(1024, 2048, 224, 24) == 35 * 77 == 2695


@pytest.mark.parametrize("stride,r", [(24, 2), (16, 1), (112, 1), (224, 1), (8, 2), (20, 4), (4, 4), (7, 16), (12, 4)])
def test_upsample_factor(stride, r):
    assert spar.upsample_factor(16, stride) == r


def test_windows_run_in_bounded_batches_across_images(tiny_backbones):
    """A 2048 x 2048 image never holds all its ~7,000 windows at once."""
    bb = tiny_backbones["maskclip-test"]
    seen = []
    real = bb.dense

    def spy(x, **kw):
        seen.append(x.shape[0])
        return real(x, **kw)

    bb.dense = spy
    try:
        x = torch.randn(1, 3, 2048, 2048)
        out = spar.sliding_window_features(bb, x, stride=24, window_batch=256)
    finally:
        del bb.dense
    assert out.shape == (1, 128, 128, bb.dim)
    assert sum(seen) == spar.count_windows(2048, 2048, 64, 24) and max(seen) <= 256


def test_many_images_of_different_sizes_equal_separate_calls(tiny_backbones):
    bb = tiny_backbones["siglip2-test"]
    imgs = [torch.randn(3, 64, 96), torch.randn(3, 128, 80), torch.randn(3, 96, 96)]
    with torch.no_grad():
        together = spar.sliding_window_features_many(bb, imgs, stride=24, window_batch=7)
        for img, got in zip(imgs, together):
            alone = spar.sliding_window_features(bb, img[None], stride=24)[0]
            torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_keeps_float32_output(tiny_backbones):
    bb = tiny_backbones["maskclip-test"]
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ref = spar.sliding_window_features(bb, x)
        low = spar.sliding_window_features(bb, x, amp_dtype=torch.bfloat16)
    assert low.dtype == torch.float32
    assert F.cosine_similarity(low.flatten(), ref.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("shape,kw,msg", [
    ((1, 3, 48, 128), {}, "smaller than the teacher crop"),
    ((1, 3, 128, 40), {}, "smaller than the teacher crop"),
    ((1, 3, 72, 128), {}, "multiple of the patch"),
    ((1, 3, 128, 128), {"stride": 0}, "stride"),
    ((1, 3, 128, 128), {"stride": 65}, "uncovered"),
    ((1, 3, 128, 128), {"crop": 40}, "crop"),
    ((1, 3, 128, 128), {"window_batch": 0}, "window_batch"),
    ((3, 128, 128), {}, "expected"),
])
def test_teacher_value_errors(tiny_backbones, shape, kw, msg):
    with pytest.raises(ValueError, match=msg):
        spar.sliding_window_features(tiny_backbones["maskclip-test"], torch.randn(*shape), **kw)


def _rel_l2(a, b):
    return float((a - b).norm() / b.norm())


BF16_REL_L2 = 2e-2  # bf16 autocast teacher vs float32, relative L2 over the whole map (stated in the README)


@pytest.mark.parametrize("name", TEST_BACKBONES)
def test_bf16_teacher_matches_fp32_within_tolerance(tiny_backbones, name):
    bb = tiny_backbones[name]
    x = torch.randn(1, 3, 112, 160)
    with torch.no_grad():
        ref = spar.sliding_window_features(bb, x, stride=24)
        low = spar.sliding_window_features(bb, x, stride=24, amp_dtype=torch.bfloat16)
    assert low.dtype == torch.float32
    assert _rel_l2(low, ref) <= BF16_REL_L2
    assert F.cosine_similarity(low.reshape(-1, bb.dim), ref.reshape(-1, bb.dim), dim=1).min() > 0.99


@pytest.mark.slow
def test_bf16_teacher_matches_fp32_within_tolerance_vitb16(vitb16):
    x = torch.randn(1, 3, 224, 272)
    with torch.no_grad():
        ref = spar.sliding_window_features(vitb16, x, stride=24)
        low = spar.sliding_window_features(vitb16, x, stride=24, amp_dtype=torch.bfloat16)
    assert _rel_l2(low, ref) <= BF16_REL_L2


@pytest.mark.parametrize("name", TEST_BACKBONES)
def test_attention_runs_through_sdpa(tiny_backbones, name):
    """Every backbone's attention goes through F.scaled_dot_product_attention (flash kernel on CPU),
    not nn.MultiheadAttention's own fast path or a hand-written softmax."""
    from torch.profiler import profile

    from pipeline.bench.teacher import attention_kernels

    bb = tiny_backbones[name]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert attention_kernels(lambda: bb.dense(x)) == ["flash"]
        with profile() as prof:
            bb.dense(x)
    names = {e.key for e in prof.key_averages()}
    assert not any("native_multi_head_attention" in n or n == "aten::_softmax" for n in names), names


def test_index_tables_live_on_the_images_device(tiny_backbones):
    """The window loop reads its tables on the device: nothing is copied from the host per chunk."""
    from spar.teacher import _Layout

    layout = _Layout.build([(128, 160), (64, 96)], 64, 24, 8, "meta")
    assert {t.device.type for t in (layout.pixel, layout.row_stride, layout.cell, layout.cell_stride)} == {"meta"}


def test_default_window_batch_on_cpu(tiny_backbones):
    assert spar.default_window_batch(tiny_backbones["maskclip-test"], 64, torch.device("cpu")) == 64


@pytest.mark.slow
def test_compiled_window_forward_equals_eager(tiny_backbones):
    """torch.compile of the window forward (static shape, last chunk padded) gives the eager teacher."""
    bb = tiny_backbones["maskclip-test"]
    x = torch.randn(1, 3, 112, 160)  # 3 x 5 = 15 windows: chunks of 8 and 7 (padded to 8)
    compiled = spar.CompiledWindows(bb, window_batch=8)
    with torch.no_grad():
        ref = spar.sliding_window_features(bb, x, stride=24, window_batch=8)
        got = spar.sliding_window_features(bb, x, stride=24, window_batch=8, forward=compiled)
        low_ref = spar.sliding_window_features(bb, x, stride=24, window_batch=8, amp_dtype=torch.bfloat16)
        low = spar.sliding_window_features(bb, x, stride=24, window_batch=8, amp_dtype=torch.bfloat16,
                                           forward=compiled)
    assert _rel_l2(got, ref) <= 1e-5
    assert _rel_l2(low, ref) <= BF16_REL_L2 and _rel_l2(low, low_ref) <= BF16_REL_L2
    if torch.backends.mkldnn.is_available():  # frozen: the weights are prepacked for the CPU GEMM library
        from torch.profiler import profile

        with torch.no_grad(), profile() as prof:
            compiled(x[:, :, :64, :64].expand(8, -1, -1, -1).contiguous())
        ops = {e.key for e in prof.key_averages()}
        assert ops & {"mkl::_mkl_linear", "mkldnn::_linear_pointwise"} and "aten::addmm" not in ops, sorted(ops)
