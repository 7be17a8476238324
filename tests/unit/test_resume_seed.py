"""A resume keeps the data order it started with: a run checkpointed with one `seed` is refused
with another, on the driver before any worker starts, naming both seeds."""
import json

import pytest
import torch

from pipeline.storage import Storage
from pipeline.train.checkpoint import CheckpointError, RunState, check_latest_checkpoint, check_seed, write_checkpoint


def test_another_seed_is_refused_naming_both():
    check_seed(0, 0, "the run r")
    check_seed(None, 3, "the run r")  # a checkpoint that predates the record: resumed with the seed given
    with pytest.raises(CheckpointError, match=r"the run r was trained with seed=0, this run has seed=1.*"
                                              r"Pass seed=0 to resume this run, or a new name="):
        check_seed(0, 1, "the run r")


def test_the_driver_reads_the_seed_of_the_checkpoint_ray_would_resume(tmp_path):
    """The checkpoint Ray Train's snapshot names as the latest, with seed 7 in its run state."""
    run = tmp_path / "run"
    (run / "checkpoint_000003").mkdir(parents=True)
    write_checkpoint(str(run / "checkpoint_000003"), {"w": torch.zeros(2)}, {}, {"step": 0},
                     RunState(step=3, seed=7), {})
    (run / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_000003"}}))
    check_latest_checkpoint(Storage(), str(run), seed=7)
    check_latest_checkpoint(Storage(), str(run))  # no seed to compare: the format checks only
    with pytest.raises(CheckpointError, match=rf"{run} was trained with seed=7, this run has seed=8"):
        check_latest_checkpoint(Storage(), str(run), seed=8)
