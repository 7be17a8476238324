"""Train the single-pass student: `python jobs/train_student.py cache=<url> [preset.yaml] [key=value ...]`.

Runs a Ray Train TorchTrainer with DeepSpeed on the cache's committed shards; the student starts
from the cache's teacher. Re-running the same command (same output and name) resumes. Keys: see
`pipeline.train.job.TrainConfig`; `scaling.num_workers` / `scaling.use_gpu` scale it out.
"""
from __future__ import annotations

from pipeline.cache.reader import CacheError
from pipeline.cli import run_job
from pipeline.train.checkpoint import CheckpointError
from pipeline.train.job import TrainConfig, run


def main(argv: list[str] | None = None) -> dict:
    """Train (or resume) and print the final metrics; exits non-zero on bad input."""
    return run_job(TrainConfig, run, argv, expected=(CacheError, CheckpointError, FileNotFoundError))


if __name__ == "__main__":
    main()
