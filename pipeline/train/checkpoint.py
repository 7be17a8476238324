"""Checkpoints of a run: DeepSpeed's trainable weights and ZeRO optimizer shards, plus the run's
position (`RunState`) as client state. Every rank saves into a temp dir and reports it to Ray
Train, which merges the ranks' directories into one committed checkpoint."""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field

log = logging.getLogger(__name__)
CKPT_TAG = "ds"


@dataclass
class RunState:
    """Position of the run; saved as DeepSpeed client state."""

    step: int = 0  # micro-steps done (all ranks step together)
    epoch: int = 0
    epoch_step: int = 0
    consumed: list[int] = field(default_factory=list)  # batches consumed per loader process this epoch
    samples: int = 0  # real samples this rank trained on
    world_size: int = 1
    cache_version: int | None = None  # the cache's manifest version this run reads (pinned at its start)


def save_checkpoint(engine, state: RunState, metrics: dict) -> None:
    """Every rank saves its part into a temp dir and reports it; returns once it is committed."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="spar-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state={"run_state": state.__dict__},
                               exclude_frozen_parameters=True)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    # a report can be lost if this worker dies within the controller's poll interval: wait for it
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def load_checkpoint(engine, world_size: int) -> RunState:
    """Restore from Ray Train's latest checkpoint, if any."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return RunState(world_size=world_size)
    with ckpt.as_directory() as d:
        _, client = engine.load_checkpoint(d, tag=CKPT_TAG, load_module_strict=False)
    state = RunState(**client["run_state"])
    if state.world_size != world_size:
        log.warning("resuming with %d workers instead of %d: epoch %d restarts its data order",
                    world_size, state.world_size, state.epoch)
        state.epoch_step, state.consumed, state.world_size = 0, [], world_size
    log.info("resumed at step %d (epoch %d, step %d of the epoch)", state.step, state.epoch, state.epoch_step)
    return state
