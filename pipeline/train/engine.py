"""The student as DeepSpeed sees it: precision, the generated DeepSpeed config, the engine."""
from __future__ import annotations

import os

import torch

import spar
from pipeline.train.collectives import all_gather_str

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def setup_env() -> None:
    """Pick DeepSpeed's CPU accelerator on machines without a GPU (before the first deepspeed import)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def resolve_precision(precision: str, *, gpu: bool, bf16: bool) -> str:
    """The precision a rank trains in. ``auto``: bf16 on GPUs with native bf16 (`bf16`), fp16 on
    GPUs without it, fp32 on CPUs; any other value as given. Pure: the caller says what the device
    is (`device_capability`), so it is decided where the training runs, never on the driver."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if gpu:
        return "bf16" if bf16 else "fp16"
    return "fp32"


def device_capability(device: torch.device) -> tuple[bool, bool]:
    """(is a GPU, has native bf16) of this process's `device`. Emulated bf16 (pre-Ampere GPUs, which
    `torch.cuda.is_bf16_supported()` counts by default) is slower than fp16 there: it does not count."""
    if device.type != "cuda":
        return False, False
    return True, bool(torch.version.hip) or torch.cuda.get_device_properties(device).major >= 8


def worker_precision(precision: str, device: torch.device) -> str:
    """On every Ray Train rank, before its engine is built: `precision` with ``auto`` resolved from
    every rank's own device (a collective then). Ranks all-reduce in one dtype, so one rank without
    bf16 makes the run fp16."""
    if precision != "auto":  # no collective: every rank has the same config
        return precision
    gpu, bf16 = device_capability(device)
    every = all_gather_str(f"{gpu:d}{bf16:d}")
    return resolve_precision(precision, gpu=all(c[0] == "1" for c in every), bf16=all(c[1] == "1" for c in every))


def deepspeed_config(cfg, world_size: int, extra: dict | None = None, precision: str | None = None) -> dict:
    """The DeepSpeed config of the job config, with `extra` (the user's JSON file) merged over it.

    `precision` is the one the ranks resolved (`worker_precision`). Without it (the driver, which
    checks the JSON before any worker starts) ``precision=auto`` stays unresolved: the config has no
    ``bf16`` / ``fp16`` section, since only the workers know their devices.

    The job's own keys decide what they name; a JSON that sets one of them to another value is
    refused (`ConfigError`, naming both), as is an optimizer or scheduler section (the job owns
    AdamW, whose state its checkpoints store), and, with ``precision=auto``, any ``bf16.enabled`` or
    ``fp16.enabled`` (it would contradict ``auto`` on some device)."""
    from pipeline.config import ConfigError

    if precision is not None and precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"a rank's precision is bf16, fp16 or fp32 (resolve_precision), got {precision!r}")
    precision = precision or cfg.precision
    ds = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if precision != "auto":
        ds["bf16"] = {"enabled": precision == "bf16"}
        ds["fp16"] = {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16}
    extra = extra or {}
    owned = {  # DeepSpeed key path -> (job key, the job's value)
        ("train_micro_batch_size_per_gpu",): ("batch_size", cfg.batch_size),
        ("gradient_accumulation_steps",): ("grad_accum", cfg.grad_accum),
        ("train_batch_size",): ("batch_size x grad_accum x scaling.num_workers", ds["train_batch_size"]),
        ("gradient_clipping",): ("grad_clip", cfg.grad_clip),
        ("zero_optimization", "stage"): ("zero_stage", cfg.zero_stage),
        ("bf16", "enabled"): ("precision", precision == "bf16"),
        ("fp16", "enabled"): ("precision", precision == "fp16"),
    }
    conflicts = []
    for path, (key, value) in owned.items():
        given = _get(extra, path)
        if given is None:
            continue
        if key == "precision" and cfg.precision == "auto":
            conflicts.append(f"{'.'.join(path)}={_show(given)} but precision=auto, which each worker resolves from "
                             "its own device (set precision=bf16, fp16 or fp32 to choose)")
        elif given != value:
            shown = cfg.precision if key == "precision" else value
            conflicts.append(f"{'.'.join(path)}={_show(given)} but {key}={_show(shown)}")
    for section in ("optimizer", "scheduler"):
        if section in extra:
            conflicts.append(f"a {section!r} section, but the job owns the optimizer (lr, weight_decay, betas)")
    if conflicts:
        raise ConfigError("deepspeed_config contradicts the job: " + "; ".join(conflicts)
                          + ". Set these with the job's keys (they also decide the data plan and checkpoints) "
                          "and leave them out of the JSON")
    _deep_update(ds, extra)
    return ds


def _get(d: dict, path: tuple[str, ...]):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _show(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _deep_update(base: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def _no_cpu_shm_collectives() -> None:
    """On a CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce op when it
    starts (C++ through ninja: ~40 s of both cores here, a compiler on every node, and again each
    time the Python environment moves) that only its inference collectives use; training reduces
    through torch.distributed (gloo). Marking the op unavailable, before the backend starts, keeps
    it from being built."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(cfg, source: dict, ds_config: dict, storage_options: dict | None = None):
    """The student (= teacher weights, fetched with `storage_options` if remote), trainable per
    spec, wrapped by `deepspeed.initialize` with `ds_config` (`deepspeed_config` with this rank's
    resolved precision)."""
    import deepspeed

    student = spar.load_backbone(source["backbone"], pretrained=source["pretrained"], init_seed=source["init_seed"],
                                 storage_options=storage_options)
    spar.set_trainable(student, cfg.trainable)
    student.drop_text_tower()  # never used here; export re-attaches it from the teacher's weights
    student.train()
    student.set_rope_rescale(getattr(cfg, "rope_rescale", None))  # dinov3txt: train-mode RoPE augmentation
    if cfg.activation_checkpointing:
        student.set_grad_checkpointing(True)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    _no_cpu_shm_collectives()
    engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, model_parameters=params,
                                      config=ds_config, dist_init_required=False)
    if engine.dp_world_size == 1 and engine.zero_optimization_stage() == 0:
        # One rank has nothing to average; DeepSpeed would still flatten, all-reduce and copy back.
        engine.enable_backward_allreduce = False
    return engine
