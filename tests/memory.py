"""A computation shaped like a ViT forward for the allocator's sake: large intermediates made and
freed in turn, each over glibc's default mmap threshold of 32 MiB."""
from __future__ import annotations

import resource

import torch

TENSOR = 16 * 2 ** 20  # float32 elements: 64 MiB
PAGES = TENSOR * 4 // resource.getpagesize()  # pages of one such tensor


def large_intermediates(x: torch.Tensor) -> torch.Tensor:
    """Nine 64 MiB tensors, one after another, from a 64 MiB `x` (glibc's default maps each afresh)."""
    y = x * 2
    for _ in range(4):
        y = torch.nn.functional.gelu(y) + 1
    return y.sum()
