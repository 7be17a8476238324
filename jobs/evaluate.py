"""Evaluate open-vocabulary segmentation: `python jobs/evaluate.py dataset=<name> root=<dir> [key=value ...]`.

`features=single|sliding|student|all` or a comma list (student needs `checkpoint=<student.safetensors>`).
Writes `<output>/<backbone>/<dataset>/<mode>.json` and rebuilds the paper-style tables
`<output>/table.md` / `table.json` from every result under `output`, so running one command per
dataset fills in the six-benchmark table. `ray=true` spreads the images over the cluster's GPUs
(under `ray job submit` it attaches). Keys: see `pipeline.evaluate.evaluator.EvalConfig`.
"""
from __future__ import annotations

from pipeline.cli import run_job
from pipeline.evaluate.datasets import DatasetError
from pipeline.evaluate.evaluator import EvalConfig
from pipeline.evaluate.job import run


def main(argv: list[str] | None = None) -> dict:
    """Evaluate and print the comparison table; exits non-zero on a bad config or dataset tree."""
    return run_job(EvalConfig, run, argv, expected=(DatasetError, FileNotFoundError),
                   show=lambda result: print(result["table"]))


if __name__ == "__main__":
    main()
