"""`benchmark.py teacher` on a tiny backbone: what it reports, with either ceiling method."""
import pytest

from pipeline.bench.teacher import InterleavedCeiling, TeacherBench, bench_teacher
from pipeline.config import ConfigError


def _run(**keys) -> dict:
    defaults = dict(backbone="maskclip-test", height=112, width=160, stride=24, dtype="float32", window_batch=8,
                    repeats=2)
    return bench_teacher(TeacherBench(**{**defaults, **keys}))


@pytest.mark.parametrize("ceiling,method", [("auto", "interleaved"),  # a CPU's default: sampled between chunks
                                            pytest.param("beside", "beside", marks=pytest.mark.slow)])
def test_teacher_bench_reports_throughput_against_a_ceiling(ceiling, method):
    r = _run(ceiling=ceiling)
    assert r["ceiling_method"] == method and r["dtype"] == "float32" and r["windows"] == 15
    assert r["teacher_s"] > 0 and r["windows_per_s"] == pytest.approx(15 / r["teacher_s"])
    assert 0 < r["vit_only_s"] and 0 <= r["outside_vit_share"] < 1
    assert r["gemm_ceiling_tflops"] > 0 and r["best_ceiling_tflops"] >= r["gemm_ceiling_tflops"] * (ceiling == "beside")
    assert 0 < r["mfu"] and r["model_tflops"] == pytest.approx(r["gflop_per_window"] * r["windows_per_s"] / 1e3)
    assert r["attention_kernels"] == ["flash"]


def test_interleaved_ceiling_times_its_gemms_apart_from_the_forward():
    import torch

    calls = []
    paired = InterleavedCeiling(lambda c: calls.append(c.shape[0]) or c, flop_per_window=4 * 64 ** 3,
                                device=torch.device("cpu"), amp=None, n=64, beside=lambda c: calls.append(-1))
    x = torch.zeros(3, 1)
    assert paired(x) is x and calls == [-1, 3]
    assert paired.flop == 3 * 2 * 64 ** 3  # half the chunk's 3 x 4 * 64^3 FLOP, in 64^3 GEMMs
    assert paired.seconds > 0 and paired.forward_seconds >= 0 and paired.beside_seconds >= 0


def test_bad_ceiling_method_is_refused():
    assert TeacherBench(ceiling="interleaved").ceiling == "interleaved"  # the CPU default, also asked for by name
    with pytest.raises(ConfigError, match="ceiling"):
        TeacherBench(ceiling="sometimes")


@pytest.mark.slow
def test_compiled_teacher_is_compared_with_eager_on_the_same_chunks():
    r = _run(compile=True)
    # the speed-up is the median of each repeat's eager / compiled time: a timing, not asserted
    assert r["compile"] and r["eager_teacher_s"] > 0 and r["eager_mfu"] > 0 and r["compile_speedup"] > 0


@pytest.mark.slow
def test_freed_memory_comparison_counts_the_page_faults_of_each_mode():
    """Kept freed memory serves a forward's large intermediates from the heap; glibc's default maps
    (and faults in) each of them afresh."""
    import torch

    from pipeline.bench.teacher import freed_memory_comparison
    from pipeline.devices import keep_freed_memory
    from tests.memory import PAGES, TENSOR, large_intermediates

    if not keep_freed_memory():
        pytest.skip("the C library is not glibc")
    x = torch.ones(TENSOR)  # 64 MiB: over glibc's default mmap threshold of 32 MiB
    r = freed_memory_comparison(large_intermediates, x, None, rounds=3)
    faults = r["page_faults_per_forward"]
    assert faults["glibc_default"] > PAGES and faults["kept"] < PAGES // 10  # default: 2-9 x pages
    assert r["freed_memory_kept_speedup"] > 0
    assert keep_freed_memory()  # kept again afterwards


@pytest.mark.slow
def test_teacher_bench_compares_freed_memory_modes_on_request():
    from pipeline.devices import keep_freed_memory

    if not keep_freed_memory():
        pytest.skip("the C library is not glibc")
    r = _run(malloc_compare=True)  # the tiny model's blocks are small: few page faults in either mode
    assert r["freed_memory_kept_speedup"] > 0
    assert set(r["page_faults_per_forward"]) == {"kept", "glibc_default"}
    assert all(f >= 0 for f in r["page_faults_per_forward"].values())
