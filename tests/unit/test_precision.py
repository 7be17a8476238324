"""Precision where the work runs. The teacher's: resolved from the request and the devices Ray gives
the actors (never the driver's own), recorded in the fingerprint, and priced by the planner at the
rate it will run at. The student's: ``precision=auto`` resolved on the training ranks from their own
devices, into the DeepSpeed config that runs and the ``student.json`` that records it."""
from types import SimpleNamespace

import pytest
import torch

from pipeline.cache.job import CacheConfig, build_fingerprint, teacher_precision
from pipeline.config import ConfigError, parse_config
from pipeline.devices import resolve_compute_dtype, use_compute_dtype
from pipeline.plan import PlanConfig, plan
from pipeline.storage import Storage
from pipeline.train import engine
from pipeline.train.job import TrainConfig


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


def test_a_cpu_head_node_gives_gpu_teacher_actors_their_gpu_precision(monkeypatch):
    """The documented cluster: a CPU-only head (the driver sees no GPU) and autoscaled GPU workers.
    The teacher's precision follows the actors' GPUs, and nothing on the way asks the driver's torch."""
    from pipeline.ray_utils import resolve_pool

    def driver_gpu(*_):
        raise AssertionError("the driver's own device was consulted")

    monkeypatch.setattr(torch.cuda, "is_available", driver_gpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", driver_gpu)
    cfg = parse_config(CacheConfig, ["backbone=maskclip-test"])
    pool = resolve_pool(device="auto", num_gpus=-1.0, num_cpus=-1.0, num_actors=0, min_actors=0, max_actors=0,
                        gpus_now=0, gpus_max=8, cpu_nodes=1)
    assert pool.num_gpus == 1.0
    assert teacher_precision(cfg, gpu=pool.num_gpus > 0) == "bfloat16"
    assert teacher_precision(cfg, gpu=pool.num_gpus > 0, gpu_types=("V100",)) == "float16"


@pytest.mark.parametrize("requested,gpu,bf16,want", [
    ("auto", True, True, "bf16"), ("auto", True, False, "fp16"), ("auto", False, False, "fp32"),
    ("fp32", True, True, "fp32"), ("bf16", False, False, "bf16"),
])
def test_student_precision_follows_the_request_and_the_rank_device(requested, gpu, bf16, want):
    assert engine.resolve_precision(requested, gpu=gpu, bf16=bf16) == want


@pytest.mark.parametrize("major,native", [(9, True), (8, True), (7, False)])  # H100, A100, V100
def test_emulated_bf16_does_not_count(monkeypatch, major, native):
    """torch counts a V100's emulated bf16 as supported by default; training there runs fp16."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major))
    assert engine.device_capability(torch.device("cuda", 0)) == (True, native)
    assert engine.device_capability(torch.device("cpu")) == (False, False)


def test_auto_is_resolved_on_the_ranks_and_recorded_as_it_ran(tmp_path, monkeypatch):
    """A job whose driver sees no GPU and whose rank has a bf16 GPU: the driver's DeepSpeed config
    leaves precision unresolved, the rank resolves bf16 into the config it builds, and student.json
    records that config and that precision."""
    from pipeline.train.checkpoint import RunState
    from pipeline.train.export import run_record

    cfg = parse_config(TrainConfig, [f"cache={tmp_path}/cache", "scaling.num_workers=2", "zero_stage=2"])
    def driver_gpu(*_):
        raise AssertionError("the driver's own device was consulted")

    monkeypatch.setattr(torch.cuda, "is_available", driver_gpu)  # the driver, a CPU head node, is never asked
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", driver_gpu)
    driver = engine.deepspeed_config(cfg, 2, {"zero_optimization": {"overlap_comm": True}})
    assert "bf16" not in driver and "fp16" not in driver  # unresolved: only the ranks know their devices

    monkeypatch.setattr(engine, "device_capability", lambda device: (device.type == "cuda", device.type == "cuda"))
    precision = engine.worker_precision(cfg.precision, torch.device("cuda", 0))  # the rank: a bf16 GPU
    ran = engine.deepspeed_config(cfg, 2, {"zero_optimization": {"overlap_comm": True}}, precision)
    assert precision == "bf16" and ran["bf16"] == {"enabled": True} and ran["fp16"]["enabled"] is False
    assert ran["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    record = run_record(cfg, {"fingerprint": "sha256:0"}, RunState(cache_version=1), 0.5, ["d", "d"], ["n", "n"],
                        ran, precision)
    assert record["precision"] == "bf16" and record["deepspeed"]["bf16"]["enabled"] is True
    assert engine.worker_precision(cfg.precision, torch.device("cpu")) == "fp32"  # a CPU rank
    assert engine.worker_precision("fp16", torch.device("cpu")) == "fp16"  # as asked


def test_ranks_without_bf16_make_the_whole_run_fp16(monkeypatch):
    """Ranks all-reduce in one dtype: one GPU without bf16 (here rank 1 of 2) decides for all."""
    monkeypatch.setattr(engine, "device_capability", lambda device: (True, True))
    monkeypatch.setattr(engine, "all_gather_str", lambda mine: [mine, "10"])
    assert engine.worker_precision("auto", torch.device("cuda", 0)) == "fp16"


def test_a_deepspeed_json_cannot_pin_what_auto_leaves_to_the_ranks(tmp_path):
    auto = parse_config(TrainConfig, [f"cache={tmp_path}/cache"])
    with pytest.raises(ConfigError, match=r"bf16\.enabled=true but precision=auto.*precision=bf16, fp16 or fp32"):
        engine.deepspeed_config(auto, 1, {"bf16": {"enabled": True}})
    bf16 = parse_config(TrainConfig, [f"cache={tmp_path}/cache", "precision=bf16"])
    assert engine.deepspeed_config(bf16, 1, {"bf16": {"enabled": True}})["bf16"]["enabled"] is True
    with pytest.raises(ConfigError, match=r"fp16\.enabled=true but precision=bf16"):
        engine.deepspeed_config(bf16, 1, {"fp16": {"enabled": True}})


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
