"""The few collectives the training loop needs; each is the identity when not distributed."""
from __future__ import annotations

import torch
import torch.distributed as dist


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` over every rank (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_gather_str(value: str) -> list[str]:
    """Every rank's `value`, in rank order."""
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    """Wait for every rank (DeepSpeed can abort at exit when ranks leave one by one)."""
    if dist.is_initialized():
        dist.barrier()
