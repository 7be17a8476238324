"""Checkpoints of a run, in formats that load without unpickling anything.

A checkpoint is one directory that Ray Train commits (rank 0 writes it; every rank restores from it):

    trainable.safetensors   the full fp32 master value of every trainable parameter
    optimizer.safetensors   AdamW's ``exp_avg`` / ``exp_avg_sq`` of each of them, full (absent before the first step)
    state.json              format, the run's position and data-order seed (`RunState`), the optimizer's
                            step count and loss scale, the DeepSpeed config that ran, the trainable
                            parameter names

The state is gathered whole, whatever the ZeRO stage and however many ranks held it, so a run
resumes bit-exactly on the same ranks and also on another number of ranks or another ZeRO stage:
each rank restores the whole value and keeps its own partition. Frozen parameters are not stored:
they are the teacher's weights, which the run loads again from its source.

DeepSpeed's own ``save_checkpoint`` is not used: its ``load_checkpoint`` ends in
``torch.load`` with ``weights_only=False``, so anyone able to write to the checkpoint prefix could run code
on every rank. Nothing here calls ``torch.load`` or ``pickle``; a file that is not what its name
says is refused, and so is a directory in DeepSpeed's (pickled) format.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import tempfile
import zlib
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT = "spar-train-checkpoint/1"
WEIGHTS, OPTIMIZER, STATE = "trainable.safetensors", "optimizer.safetensors", "state.json"
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter state
SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")  # fp16 dynamic loss scale


class CheckpointError(RuntimeError):
    """A checkpoint that this run refuses to load (not ours, not what it claims to be, or not this run's)."""


@dataclass
class RunState:
    """Where the run is. Every rank holds the same values (each can compute every rank's plan)."""

    step: int = 0  # micro-steps done (all ranks step together)
    epoch: int = 0
    epoch_step: int = 0  # steps done in the epoch's current segment
    layout: dict | None = None  # how the current segment was planned: ranks, loader processes, batch, ...
    segment: int = 0  # the epoch's segments before the current one (a resume on another layout starts one)
    done: str = ""  # positions of the epoch's order trained in earlier segments (`pack_positions`)
    samples: int = 0  # real samples trained, all ranks
    epoch_samples: int = 0  # ... in this epoch
    epoch_loss: float = 0.0  # sum of the batch losses of this epoch, all ranks (up to the last checkpoint)
    epoch_batches: int = 0  # real batches behind epoch_loss
    cache_version: int | list[int] | None = None  # the cache's manifest version this run reads (pinned at its
    # start); a mixture: one per cache, in the run's order
    mixture: dict | None = None  # a run on several caches or with mix=: its caches, mix and epoch_samples (pinned)
    epoch_cache_samples: list[int] | None = None  # a mixture: samples of each cache trained this epoch, all ranks
    val_by_cache: list[dict] | None = None  # a mixture held out per cache: each one's baseline and last MSE
    validation: dict | None = None  # what the run validates on: {"fraction"} or {"cache", "version"} (pinned)
    val_baseline: float | None = None  # held-out MSE of the untrained single pass (measured at step 0)
    val_mse: float | None = None  # held-out MSE of the student at the last validation
    seed: int | None = None  # the data order's seed (pinned: `check_seed`); None in checkpoints that predate it

    @classmethod
    def from_json(cls, value: dict) -> "RunState":
        names = {f.name for f in fields(cls)}
        unknown = set(value) - names
        if unknown:
            raise CheckpointError(f"{STATE} has unknown run-state fields {sorted(unknown)}")
        return cls(**value)


def check_seed(recorded: int | None, seed: int, where: str) -> None:
    """Refuse to resume a run whose checkpoint (`where`) was trained with another data-order seed.

    The seed orders every epoch. A resume on another layout re-plans the rest of the epoch in the
    *same* order, which keeps every sample once; another seed would re-order samples already
    trained, so some would be trained twice and others never, and the run could not be replayed.
    A checkpoint without a recorded seed (older versions) is resumed with the given one."""
    if recorded is not None and recorded != seed:
        raise CheckpointError(f"{where} was trained with seed={recorded}, this run has seed={seed}: the seed decides "
                              f"the data order, so the interrupted epoch would train some samples twice and others "
                              f"never. Pass seed={recorded} to resume this run, or a new name= to start a new run "
                              f"with seed={seed}")


def check_mixture(recorded: dict | None, wanted: dict | None, where: str) -> None:
    """Refuse to resume a run on other caches or another mixture than it started with: the epoch
    plan draws from exactly those, so another list would train some samples twice and others never."""
    if recorded != wanted:
        raise CheckpointError(f"{where} started on {_describe(recorded)}, this run is on {_describe(wanted)}: the "
                              "interrupted epoch's draws would change under its checkpoint. Keep cache=, mix= and "
                              "epoch_samples= as they were, or use a new run name")


def _describe(mixture: dict | None) -> str:
    if mixture is None:
        return "one cache"
    return f"cache={mixture['caches']} with mix={mixture['mix']}, epoch_samples={mixture['epoch_samples']}"


def pack_positions(done: np.ndarray) -> str:
    """A bool per position of an epoch's order as text: a bitmap, deflated, base64 (1M samples: ~125 KB at most)."""
    return base64.b64encode(zlib.compress(np.packbits(done).tobytes(), 9)).decode()


def unpack_positions(text: str, n: int) -> np.ndarray | None:
    """The `n` bools `pack_positions` packed into `text` (None for "")."""
    if not text:
        return None
    return np.unpackbits(np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8), count=n).astype(bool)


# --- gathering and restoring the engine's state ------------------------------------------------------


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers (ZeRO 1-3 and bf16/fp16 keep it as ``.optimizer``)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _optimizer_step(engine) -> int:
    """AdamW's step count (every parameter's is the same); 0 before the first step."""
    for s in _base_optimizer(engine).state.values():
        if "step" in s:
            return int(s["step"])
    return 0


def _partitioned(p: torch.nn.Parameter) -> bool:
    """Whether DeepSpeed reaches the fp32 master of `p` through its fragment API (ZeRO 1-3, bf16 optimizer).
    A parameter with no fragment on this rank still has the attribute (None): the collective gathers it."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _masters(engine) -> dict[int, torch.Tensor]:
    """id(parameter) -> its fp32 master, for the optimizers that keep one per parameter outside the
    fragment API (DeepSpeed's unfused fp16/bf16 optimizer at ZeRO stage 0); {} otherwise."""
    opt = engine.optimizer
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups") and not _partitioned_optimizer(opt):
        return {id(lp): hp for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups)
                for lp, hp in zip(lp_group, hp_group)}
    return {}


# Where DeepSpeed's partitioned optimizers (ZeRO-3, ZeRO-1/2, bf16) keep the flat fp32 tensors AdamW steps on
FLAT_MASTERS = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition")


def _partitioned_optimizer(opt) -> bool:
    return any(hasattr(opt, a) for a in FLAT_MASTERS)


def _stepped_tensors(engine) -> list[torch.Tensor]:
    """The tensors the torch optimizer keeps state for (ZeRO's flat fp32 partitions, the fp32 masters,
    or the parameters themselves)."""
    opt = engine.optimizer
    for attr in FLAT_MASTERS:
        if hasattr(opt, attr):
            return list(getattr(opt, attr))
    masters = _masters(engine)
    if masters:
        return list(masters.values())
    return [q for g in _base_optimizer(engine).param_groups for q in g["params"]]


def full_weights(engine) -> dict[str, torch.Tensor]:
    """The full fp32 master value of every trainable parameter, on CPU (not the bf16/fp16 copy the
    module computes with). Collective under ZeRO: every rank calls it, in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters, out = _masters(engine), {}
    for name, p in _trainable(engine):
        full = safe_get_full_fp32_param(p) if _partitioned(p) else masters.get(id(p), p)
        out[name] = full.detach().float().cpu().contiguous()
    return out


def gather_state(engine) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(fp32 weights, optimizer moments, optimizer numbers), whole, on CPU. Collective under ZeRO:
    every rank calls it, in the same order."""
    from deepspeed.utils import safe_get_full_optimizer_state

    step = _optimizer_step(engine)
    base, masters = _base_optimizer(engine), _masters(engine)
    weights, moments = full_weights(engine), {}
    for name, p in _trainable(engine):
        master = masters.get(id(p), p)
        if step:
            for key in MOMENTS:
                value = safe_get_full_optimizer_state(p, key) if _partitioned(p) else base.state[master][key]
                moments[f"{name}.{key}"] = value.detach().float().cpu().contiguous()
    numbers = {"step": step}
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is not None:
        numbers["loss_scaler"] = {k: getattr(scaler, k) for k in SCALER_FIELDS if hasattr(scaler, k)}
    return weights, moments, numbers


def restore_state(engine, weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor], numbers: dict,
                  micro_steps: int) -> None:
    """Put gathered state back into an engine of any world size / ZeRO stage (every rank calls it)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    params, masters = _trainable(engine), _masters(engine)
    names = [n for n, _ in params]
    if sorted(weights) != sorted(names):
        missing, extra = sorted(set(names) - set(weights)), sorted(set(weights) - set(names))
        raise CheckpointError(f"the checkpoint's trainable parameters differ from this run's (missing {missing[:3]}, "
                              f"unexpected {extra[:3]}): was `trainable` changed? Use a new run name")
    with torch.no_grad():
        for name, p in params:
            value = weights[name]
            if hasattr(p, "ds_id"):  # ZeRO-3: the module holds a partition; gather, set, re-partition
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    p.data.copy_(value.to(p.device, p.dtype).view_as(p))
            else:
                p.data.copy_(value.to(p.device, p.dtype).view_as(p))
            if id(p) in masters:
                masters[id(p)].data.copy_(value.view_as(p))
            safe_set_full_fp32_param(p, value.to(p.device))
    step = int(numbers.get("step", 0))
    if step:
        base = _base_optimizer(engine)
        for q in _stepped_tensors(engine):  # AdamW creates its state at the first step: create it now
            if not base.state.get(q):
                base.state[q] = {"step": torch.tensor(0.0), **{k: torch.zeros_like(q) for k in MOMENTS}}
        if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
            engine.optimizer._lazy_init_hp_params_optimizer_state()  # link each parameter to its state slice
        for name, p in params:
            for key in MOMENTS:
                value = moments[f"{name}.{key}"]
                if _partitioned(p):
                    safe_set_full_optimizer_state(p, value.to(p.device), key)
                else:
                    base.state[masters.get(id(p), p)][key].copy_(value.view_as(p))
        for s in base.state.values():
            s["step"] = torch.full_like(s["step"], float(step)) if torch.is_tensor(s["step"]) else step
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for k, v in numbers.get("loss_scaler", {}).items():
        if scaler is not None and hasattr(scaler, k):
            setattr(scaler, k, v)
    gas = engine.gradient_accumulation_steps()
    engine.micro_steps, engine.global_steps = micro_steps, micro_steps // gas
    engine.global_samples = engine.global_steps * engine.train_batch_size()


# --- files --------------------------------------------------------------------------------------------


def write_checkpoint(path: str, weights: dict, moments: dict, numbers: dict, state: RunState, info: dict) -> None:
    """The checkpoint files into the local directory `path`."""
    from safetensors.torch import save_file

    save_file(weights, os.path.join(path, WEIGHTS))
    if moments:
        save_file(moments, os.path.join(path, OPTIMIZER))
    record = {"format": FORMAT, "run_state": asdict(state), "optimizer": numbers, **info}
    with open(os.path.join(path, STATE), "w") as f:
        json.dump(record, f, indent=1)


def read_checkpoint(path: str) -> tuple[dict, dict, dict]:
    """(state.json, weights, moments) of the local checkpoint directory `path`; refuses anything else."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state_file = os.path.join(path, STATE)
    if not os.path.exists(state_file):
        found = sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs)
        raise CheckpointError(f"refusing checkpoint {path}: it has no {STATE} (files: {found[:5]}). A checkpoint in "
                              "DeepSpeed's pickled format (older versions of this job) is never loaded: anyone who "
                              "can write there could run code on every rank. Start a new run name")
    try:
        with open(state_file) as f:
            record = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"refusing checkpoint {path}: {STATE} is not JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"refusing checkpoint {path}: {STATE} is not a {FORMAT} record")
    tensors = []
    for name, required in ((WEIGHTS, True), (OPTIMIZER, bool(record["optimizer"].get("step")))):
        file = os.path.join(path, name)
        if not os.path.exists(file):
            if required:
                raise CheckpointError(f"refusing checkpoint {path}: {name} is missing")
            tensors.append({})
            continue
        try:
            tensors.append(load_file(file))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"refusing checkpoint {path}: {name} is not a safetensors file ({e}); it is "
                                  "not loaded any other way") from None
    return record, tensors[0], tensors[1]


def _safetensors_header(store, url: str) -> dict:
    """The JSON header of a safetensors file (read without the tensors); ValueError if it has none."""
    import struct

    with store.open(url, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise ValueError(f"header length {n} is not plausible")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header


_ANY = object()


def check_latest_checkpoint(store, run_dir: str, seed: int | None = None, mixture=_ANY) -> None:
    """On the driver, before any worker starts: the checkpoint Ray Train would resume `run_dir` from
    (its snapshot's latest) is one of ours, made of JSON and safetensors only, and (given `seed`) was
    trained with that seed (`check_seed`) and (given `mixture`) on those caches (`check_mixture`).
    Workers check again when they load it; this gives the
    clear error at once instead of after Ray Train's retries."""
    from pipeline import storage

    snapshot = storage.join(run_dir, "checkpoint_manager_snapshot.json")
    if not store.exists(snapshot):
        return
    try:
        record = json.loads(store.read_text(snapshot))
        latest = record.get("latest_checkpoint_result") or (record.get("checkpoint_results") or [None])[-1]
        name = latest["checkpoint_dir_name"] if latest else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return  # Ray's own file, in a shape this version does not know: the workers' check stands
    if not name:
        return
    path = storage.join(run_dir, name)
    state_url = storage.join(path, STATE)
    if not store.exists(state_url):
        raise CheckpointError(f"refusing checkpoint {storage.public_url(path)}: it has no {STATE}. A checkpoint in "
                              "DeepSpeed's pickled format (older versions of this job) is never loaded: anyone who "
                              "can write there could run code on every rank. Start a new run name")
    try:
        state = json.loads(store.read_bytes(state_url))
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} record")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"refusing checkpoint {storage.public_url(path)}: {STATE}: {e}") from None
    if seed is not None and isinstance(state.get("run_state"), dict):
        check_seed(state["run_state"].get("seed"), seed, f"the run {storage.public_url(run_dir)}")
    if mixture is not _ANY and isinstance(state.get("run_state"), dict):
        check_mixture(state["run_state"].get("mixture"), mixture, f"the run {storage.public_url(run_dir)}")
    for name in (WEIGHTS, OPTIMIZER):
        url = storage.join(path, name)
        if name == OPTIMIZER and not store.exists(url):
            continue
        try:
            _safetensors_header(store, url)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"refusing checkpoint {storage.public_url(path)}: {name} is not a safetensors "
                                  f"file ({e}); it is not loaded any other way") from None


# --- with Ray Train -------------------------------------------------------------------------------------


def save_checkpoint(engine, state: RunState, metrics: dict, info: dict, rank: int) -> None:
    """Gather the state (every rank), write it on rank 0 and report it; returns once it is committed."""
    import ray.train

    weights, moments, numbers = gather_state(engine)
    if rank == 0:
        with tempfile.TemporaryDirectory(prefix="spar-ckpt-") as tmp:
            write_checkpoint(tmp, weights, moments, numbers, state, info)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)
    # a report can be lost if this worker dies within the controller's poll interval: wait for it
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def load_checkpoint(engine, info: dict) -> RunState | None:
    """Restore Ray Train's latest checkpoint into `engine`; None when the run has none. `info` is what
    this run would write (its trainable names and source): a checkpoint of another run is refused."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        record, weights, moments = read_checkpoint(d)
    if record.get("source") != info.get("source"):
        raise CheckpointError(f"refusing checkpoint: it was written by a run of {record.get('source')}, this run "
                              f"starts from {info.get('source')}; use a new run name")
    state = RunState.from_json(record["run_state"])
    restore_state(engine, weights, moments, record["optimizer"], state.step)
    log.info("resumed at step %d (epoch %d, step %d of its segment %d)", state.step, state.epoch, state.epoch_step,
             state.segment)
    return state
