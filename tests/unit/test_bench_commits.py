"""`benchmark.py commits` at tiny sizes: concurrent writer processes and a directly written history."""

import importlib.util

import pytest

from pipeline.bench.commits import CommitBench, bench_commits

MOTO = importlib.util.find_spec("moto") is not None


@pytest.mark.slow
def test_commit_bench_lands_every_commit_and_times_appends_after_a_history():
    s3 = [150] if MOTO else []
    cfg = CommitBench(writers=[1, 2], commits=6, history=[0, 150], s3_history=s3, no_checkpoint=[150], appends=1,
                      s3=MOTO)
    result = bench_commits(cfg)
    for n in ("1", "2"):
        run = result["writers"][n]
        assert run["version"] == run["commits"] == 6  # one version per commit, none lost
        assert 0 < run["p50_ms"] <= run["p95_ms"] and run["commits_per_s"] > 0 and run["retries"] >= 0
        assert ("requests_per_commit" in run) == MOTO
    assert result["writers"]["1"]["retries"] == 0
    for where, sizes in (("local", [0, 150]), ("s3", s3)):
        assert sorted(result["history"][where]) == [str(n) for n in sizes]
        for n in sizes:
            h = result["history"][where][str(n)]
            assert h["head_version"] >= n and h["checkpoint_version"] % 100 == 99
            assert h["checkpoint_version"] == h["version"] - 1  # written by the checkpointing append
            assert h["version"] == h["head_version"] + 4  # 1 + 1 + 1 + 1 appends landed
            assert h["append_before_checkpoint_s"] > 0 and h["append_after_checkpoint_s"] > 0
    bare = result["history"]["local"]["150"]["no_checkpoint"]
    assert bare["version"] == bare["head_version"] + 1
    if MOTO:
        assert result["history"]["s3"]["150"]["append_after_checkpoint_requests"] > 0
        assert result["history"]["s3_not_measured"]["0"]["objects"] == result["history"]["local"]["0"]["objects"]
