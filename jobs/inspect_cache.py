"""Look inside a teacher cache: `python jobs/inspect_cache.py cache=<url> [samples=8] [student=<safetensors>]
[recompute=N] [output=out/inspect]`.

Prints a summary and writes summary.json, summary.txt and contact_sheet.png (each shown sample: the
image, the teacher target as PCA colours, the pre-trained single pass in the same colours, and the
student's with `student=`). `recompute=N` reruns the cache's teacher on N stored images and exits
non-zero, naming the samples, if a stored target is further from it than its encoding allows.
Keys: see `pipeline.cache.inspect.InspectConfig`.
"""
from __future__ import annotations

from pipeline.cache.inspect import AuditMismatch, InspectConfig, run
from pipeline.cache.reader import CacheError
from pipeline.cli import run_job
from spar.weights import WeightsMismatch


def main(argv: list[str] | None = None) -> dict:
    return run_job(InspectConfig, run, argv, expected=(CacheError, AuditMismatch, FileNotFoundError, WeightsMismatch),
                   show=lambda summary: None)


if __name__ == "__main__":
    main()
