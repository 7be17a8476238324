"""Device and precision names shared by the jobs (config strings -> torch objects).

A teacher's *compute dtype* is part of its cache's fingerprint, so it is resolved once, on the
driver, from the requested ``amp_dtype`` and from whether the actors get GPUs:

* ``auto``: bf16 autocast on GPUs (fp16 on GPUs without bf16), `CPU_DEFAULT` on CPUs;
* ``float32`` on a GPU is ``tf32`` (TF32 tensor-core matmuls, float32 everywhere else) unless
  ``strict_fp32`` asks for IEEE float32 matmuls; on a CPU it is float32;
* ``bfloat16`` / ``float16`` as asked.
"""
from __future__ import annotations

import torch

# compute dtype -> autocast dtype (None: no autocast; tf32 differs from float32 only in GPU matmuls)
AMP_DTYPES = {"float32": None, "tf32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
REQUESTABLE = ("auto", "float32", "bfloat16", "float16")  # what a job's amp_dtype key accepts
CPU_DEFAULT = "float32"  # the exact computation; bf16 is 2.2-3.5x faster on AMX CPUs but ~50x the float16 storage error
NO_BF16_GPUS = ("V100", "T4", "P100", "P4", "K80", "M60", "P40")  # Ray accelerator types without bf16


def resolve_compute_dtype(requested: str, *, gpu: bool, strict_fp32: bool = False,
                          gpu_types: tuple[str, ...] = ()) -> str:
    """The compute dtype a teacher on a GPU (`gpu`) or a CPU runs in (see the module docstring);
    `gpu_types` are the cluster's Ray accelerator types, when it reports them."""
    if requested not in REQUESTABLE:
        raise ValueError(f"amp_dtype must be one of {REQUESTABLE}, got {requested!r}")
    if requested == "auto":
        if not gpu:
            return CPU_DEFAULT
        return "float16" if gpu_types and all(t in NO_BF16_GPUS for t in gpu_types) else "bfloat16"
    if requested == "float32" and gpu and not strict_fp32:
        return "tf32"
    return requested


def use_compute_dtype(compute: str, device: torch.device) -> torch.dtype | None:
    """Set this process up for `compute` on `device` (TF32 matmuls on or off); returns the autocast
    dtype. Refuses what the device cannot do, naming the key that fixes it."""
    if compute not in AMP_DTYPES:
        raise ValueError(f"unknown compute dtype {compute!r}; one of {list(AMP_DTYPES)}")
    if device.type == "cuda":
        if compute == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise RuntimeError(f"{torch.cuda.get_device_name(device)} has no bfloat16: set teacher.amp_dtype=float16 "
                               "(or float32)")
        torch.backends.cuda.matmul.allow_tf32 = compute == "tf32"
        torch.backends.cudnn.allow_tf32 = compute == "tf32"
    elif compute == "tf32":
        raise RuntimeError("tf32 is a GPU precision; this teacher runs on the CPU (set teacher.amp_dtype=float32 "
                           "and device=cpu on the job that makes the cache)")
    return AMP_DTYPES[compute]


def pick_device(device: str) -> torch.device:
    """``auto``: the GPU (Ray gives each GPU actor or worker its own), else the CPU. A process that
    computes on the CPU also keeps its freed tensor memory for reuse (`keep_freed_memory`)."""
    picked = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if picked.type == "cpu":
        keep_freed_memory()
    return picked


_KEPT = False
MMAP_DEFAULT_MAX = 32 * 2 ** 20  # glibc's dynamic mmap threshold never rises above this on 64-bit
TRIM_DEFAULT = 128 * 2 ** 10


def keep_freed_memory(keep: bool = True) -> bool:
    """Let glibc's malloc keep freed blocks of any size in the heap for reuse (True once it does).

    PyTorch's CPU allocator calls malloc and free for every tensor. By default glibc serves blocks
    over 32 MiB with a fresh mmap and unmaps them on free, so every large activation of a ViT forward
    (a 64-window chunk of ViT-B/16 makes many of 40-80 MB) faults in and zeroes its pages again: about
    a million page faults per chunk, and 1.2-1.4x slower bf16 forwards on this project's 2-core CPUs
    (`benchmark.py teacher malloc_compare=true`). Raising the mmap and trim thresholds keeps them in
    the heap instead. The cost: a process holds on to its peak heap until it exits. ``keep=False``
    puts glibc's behaviour for blocks over 32 MiB back (for that comparison). A no-op (False) where
    the C library is not glibc.
    """
    global _KEPT
    if _KEPT != keep:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            return False
        m_trim_threshold, m_mmap_threshold, most = -1, -3, 2 ** 31 - 1
        mmap, trim = (most, most) if keep else (MMAP_DEFAULT_MAX, TRIM_DEFAULT)
        done = bool(mallopt(m_mmap_threshold, ctypes.c_int(mmap))) and bool(mallopt(m_trim_threshold, ctypes.c_int(trim)))
        if not keep:  # what the heap kept goes back too: else large blocks are served from it, without faults
            libc.malloc_trim(ctypes.c_size_t(0))
        _KEPT = keep and done
    return _KEPT


def device_name(device: torch.device) -> str:
    """The device as a reader of a results table wants it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (so wall-clock timings include it); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
