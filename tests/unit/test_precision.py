"""The teacher's precision: resolved from the request and the actors' devices, recorded in the
fingerprint, and priced by the planner at the rate it will run at."""
import pytest
import torch

from pipeline.cache.job import CacheConfig, build_fingerprint, teacher_precision
from pipeline.config import parse_config
from pipeline.devices import resolve_compute_dtype, use_compute_dtype
from pipeline.plan import PlanConfig, plan
from pipeline.storage import Storage


@pytest.mark.parametrize("requested,gpu,strict,types,want", [
    ("auto", False, False, (), "float32"),  # CPUs: the reference precision
    ("auto", True, False, (), "bfloat16"),
    ("auto", True, False, ("H100",), "bfloat16"),
    ("auto", True, False, ("V100",), "float16"),  # no bf16 on the GPUs the cluster reports
    ("auto", True, False, ("A100", "T4"), "bfloat16"),
    ("float32", True, False, (), "tf32"),
    ("float32", True, True, (), "float32"),
    ("float32", False, False, (), "float32"),
    ("bfloat16", False, False, (), "bfloat16"),
    ("float16", True, False, (), "float16"),
])
def test_compute_dtype_follows_the_request_and_the_device(requested, gpu, strict, types, want):
    assert resolve_compute_dtype(requested, gpu=gpu, strict_fp32=strict, gpu_types=types) == want


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="amp_dtype"):
        resolve_compute_dtype("int4", gpu=True)
    with pytest.raises(Exception, match="amp_dtype"):
        parse_config(CacheConfig, ["teacher.amp_dtype=fp8"])


def test_tf32_is_a_gpu_precision():
    with pytest.raises(RuntimeError, match="GPU"):
        use_compute_dtype("tf32", torch.device("cpu"))
    assert use_compute_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    assert use_compute_dtype("float32", torch.device("cpu")) is None


def test_the_fingerprint_records_precision_and_image_encoding(tmp_path):
    cfg = parse_config(CacheConfig, ["backbone=maskclip-test", f"output={tmp_path / 'c'}"])
    cpu = build_fingerprint(cfg, Storage(), teacher_precision(cfg, gpu=False))
    gpu = build_fingerprint(cfg, Storage(), teacher_precision(cfg, gpu=True))
    png = build_fingerprint(parse_config(CacheConfig, ["backbone=maskclip-test", f"output={tmp_path / 'c'}",
                                                       "image_encoding=png"]), Storage())
    assert (cpu["compute_dtype"], gpu["compute_dtype"]) == ("float32", "bfloat16")
    assert (cpu["image_format"], png["image_format"]) == ("raw", "png")
    assert len({cpu["fingerprint"], gpu["fingerprint"], png["fingerprint"]}) == 3


def test_the_plan_prices_the_teacher_at_the_precision_it_will_run_in():
    base = dict(images=100, resolution=[1024, 2048], backbone="maskclip-test")
    bf16, tf32, fp32 = (plan(PlanConfig(**base, **kw)) for kw in
                        ({}, {"teacher_amp_dtype": "float32"}, {"teacher_amp_dtype": "float32", "strict_fp32": True}))
    assert (bf16["teacher_precision"], tf32["teacher_precision"], fp32["teacher_precision"]) == \
        ("bfloat16", "tf32", "float32")
    assert bf16["teacher_gpu_hours"] < tf32["teacher_gpu_hours"] < fp32["teacher_gpu_hours"]
    assert tf32["teacher_gpu_hours"] == pytest.approx(2 * bf16["teacher_gpu_hours"])


def test_the_plan_gives_loader_cores_per_gpu_for_the_image_encoding():
    base = dict(images=100, resolution=[1024, 2048], backbone="maskclip-test")
    raw, png = plan(PlanConfig(**base)), plan(PlanConfig(**base, image_encoding="png"))
    assert raw["image_encoding"] == "raw" and raw["loader_cores_per_gpu"] < png["loader_cores_per_gpu"]
    assert raw["cache"]["float16"]["bytes_per_sample"] > png["cache"]["float16"]["bytes_per_sample"]
    measured = plan(PlanConfig(**base, loader_samples_per_s_per_core=10.0))
    assert measured["loader_cores_per_gpu"] == pytest.approx(measured["train_images_per_s_per_gpu"] / 10.0)
    half = plan(PlanConfig(**dict(base, resolution=[1024, 1024])))
    assert half["loader_samples_per_s_per_core"] == pytest.approx(2 * raw["loader_samples_per_s_per_core"], rel=1e-3)
    assert raw["loader_samples_per_s_per_core"] == pytest.approx(61.2 * 14.69e6 / raw["cache"]["float16"]["bytes_per_sample"])


def test_cpu_processes_reuse_freed_tensor_memory():
    """Once a CPU device is picked, the large tensors of a computation run again reuse the freed
    memory of the first run instead of faulting in (and zeroing) fresh mappings."""
    import resource

    from pipeline.devices import keep_freed_memory, pick_device
    from tests.memory import PAGES, TENSOR, large_intermediates

    assert pick_device("cpu").type == "cpu"
    if not keep_freed_memory():
        pytest.skip("the C library is not glibc")
    x = torch.ones(TENSOR)  # 64 MiB: glibc's default would mmap and unmap every such tensor

    def faults() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        large_intermediates(x)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    # the heap grows to the computation's peak within a few runs (from whatever earlier code left);
    # glibc's default faults in ~9 x pages on every run
    assert min(faults() for _ in range(6)) < PAGES // 10  # default: ~9 x pages
