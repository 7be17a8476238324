"""`benchmark.py scale` on a small synthetic cache: every step measured in its own process."""

import pytest

from pipeline.bench.scale import ScaleBench, bench_scale


@pytest.mark.slow
def test_scale_bench_measures_every_step_of_a_synthetic_cache():
    result = bench_scale(ScaleBench(samples=3000, world_size=16, samples_per_shard=32, rows_per_commit=1000,
                                    mixtures=[3]))
    assert not [k for k in result if k.endswith("_error")], result
    assert result["opened_samples"] == 3000 and result["plan_steps"] > 0
    # the same samples as a mixture of 3 caches drawn 1:2:3: as many draws, so as many steps on 16 ranks
    assert result["plan_mix3_steps"] == result["plan_steps"] and result["plan_mix3_s"] > 0
    assert result["plan_mix3_bytes_per_sample"] >= 0
    assert 0 < result["val_held_out"] < 3000
    for step in ("open", "plan", "resume"):
        assert result[f"{step}_s" if step != "resume" else "resume_plan_s"] > 0
        assert result[f"{step}_peak_gb"] >= 0


def test_a_measuring_process_imports_no_torch():
    """Each step runs in a fresh process that imports what the step needs: the planner, the split and
    the manifest readers, not torch (whose import every step would otherwise pay)."""
    import subprocess
    import sys

    code = "import sys; from pipeline.bench.scale import _child; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
