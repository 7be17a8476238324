"""Device and precision names shared by the jobs (config strings -> torch objects)."""
from __future__ import annotations

import torch

AMP_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}  # None: no autocast


def pick_device(device: str) -> torch.device:
    """``auto``: the GPU (Ray gives each GPU actor or worker its own), else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def device_name(device: torch.device) -> str:
    """The device as a reader of a results table wants it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (so wall-clock timings include it); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
