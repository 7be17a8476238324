"""The student as DeepSpeed sees it: precision, the generated DeepSpeed config, the engine."""
from __future__ import annotations

import os

import torch

import spar

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def setup_env() -> None:
    """Pick DeepSpeed's CPU accelerator on machines without a GPU (before the first deepspeed import)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def resolve_precision(precision: str) -> str:
    """``auto``: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def deepspeed_config(cfg, world_size: int, extra: dict | None = None) -> dict:
    """The DeepSpeed config of the job config, with `extra` (the user's JSON file) merged over it."""
    precision = resolve_precision(cfg.precision)
    ds = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    _deep_update(ds, extra or {})
    return ds


def _deep_update(base: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def build_engine(cfg, source: dict, world_size: int, ds_extra: dict | None = None,
                 storage_options: dict | None = None):
    """The student (= teacher weights, fetched with `storage_options` if remote), trainable per
    spec, wrapped by `deepspeed.initialize`."""
    import deepspeed

    student = spar.load_backbone(source["backbone"], pretrained=source["pretrained"], init_seed=source["init_seed"],
                                 storage_options=storage_options)
    spar.set_trainable(student, cfg.trainable)
    student.drop_text_tower()  # never used here; export re-attaches it from the teacher's weights
    student.train()
    if cfg.activation_checkpointing:
        student.set_grad_checkpointing(True)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, model_parameters=params,
                                      config=deepspeed_config(cfg, world_size, ds_extra), dist_init_required=False)
    if world_size == 1 and engine.zero_optimization_stage() == 0:
        # One rank has nothing to average; DeepSpeed would still flatten, all-reduce and copy back.
        engine.enable_backward_allreduce = False
    return engine


def fp32_param(p: torch.Tensor) -> torch.Tensor:
    """The full fp32 master value of a parameter (a collective under ZeRO: every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(p)
    return p.detach() if value is None else value
