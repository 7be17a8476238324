"""jobs/plan.py: its window and FLOP counts agree with the library's."""
import pytest
import torch
import torch.nn.attention
from torch.utils.flop_counter import FlopCounterMode

import spar
from jobs import plan as plan_job
from pipeline.plan import PlanConfig, mean_student_step_flops, plan, student_step_flops, window_flops


def test_fixed_resolution_counts_agree_with_the_library():
    r = plan(PlanConfig(images=1000, resolution=[1024, 2048], gpus=8))
    assert r["windows_per_image"] == spar.count_windows(1024, 2048, 224, 24) == 2695
    assert r["windows_total"] == 1000 * 2695
    assert r["teacher_pflop"] == pytest.approx(2695 * 1000 * r["gflop_per_window"] / 1e6)
    assert 30 < r["gflop_per_window"] < 40  # ViT-B/16 at 224: ~35 GFLOP
    assert r["student_step_tflop"] > 3.66  # > one forward pass at 1024 x 2048 (~3.66 TFLOP)
    assert r["shards"] == -(-1000 // 32)


def test_meta_flop_count_equals_a_real_forward():
    bb = spar.load_backbone("maskclip-test", pretrained=None)
    counter = FlopCounterMode(display=False)
    # the math SDPA backend spells attention out as matmuls, so the counter sees every one
    with counter, torch.no_grad(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        bb.dense(torch.randn(1, 3, 64, 64))
    assert window_flops(spar.load_backbone("maskclip-test", pretrained=None, device="meta"), 64) == counter.get_total_flops()


@pytest.mark.parametrize("backbone", ["maskclip-test", "dinov3txt-test"])
def test_the_mean_student_step_equals_counting_every_size(backbone):
    """Counted at three sizes, the quadratic in the token count gives the other sizes' counts exactly."""
    bb = spar.load_backbone(backbone, pretrained=None, device="meta")
    spar.set_trainable(bb, spar.DEFAULT_TRAINABLE)
    sizes = [(64, 64), (96, 160), (128, 128), (160, 224), (64, 256), (96, 160)]
    counted = sum(student_step_flops(bb, h, w) for h, w in sizes) / len(sizes)
    assert mean_student_step_flops(bb, sizes, spar.get_spec(backbone).patch_size) == counted


@pytest.mark.slow
def test_sampled_sizes_follow_the_augmentation_and_rates_scale():
    base = dict(images=25000, backbone="maskclip-test", draws=64)
    r8, r16 = plan(PlanConfig(**base, gpus=8)), plan(PlanConfig(**base, gpus=16))
    h, w = r8["mean_image_hw"]
    assert 512 <= h <= 1024 and 512 <= w <= 2048
    assert r16["teacher_wall_hours"] == pytest.approx(r8["teacher_wall_hours"] / 2)
    measured = plan(PlanConfig(**base, teacher_windows_per_s=1000.0))
    assert measured["teacher_gpu_hours"] == pytest.approx(measured["windows_total"] / 1000 / 3600)
    assert r8["cache"]["int8"]["bytes_per_sample"] < r8["cache"]["float16"]["bytes_per_sample"] < \
        r8["cache"]["float32"]["bytes_per_sample"]


def test_plan_job_prints_the_estimate(capsys):
    out = plan_job.main(["images=10", "backbone=maskclip-test", "draws=8"])
    assert "teacher_gpu_hours" in capsys.readouterr().out and out["samples"] == 10
