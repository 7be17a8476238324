"""`benchmark.py cache`: the cache job end to end against the bare teacher on the same images (the
steady state is the difference of a run on N and on 2N images), and each target encoding's bytes
per token and error against float32."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

import spar
from pipeline import storage
from pipeline.bench.common import synthetic_cache
from pipeline.devices import device_name


@dataclass(kw_only=True)
class CacheBench:
    """`benchmark.py cache`: job overhead over the bare teacher, and target encodings."""

    backbone: str = "maskclip"  # the real-size model (random init)
    images: int = 3  # the job runs on `images`, then on 2 x `images` (steady state = the difference)
    scale: list[int] = field(default_factory=lambda: [512, 384])  # augmentation scale for `backbone`
    min_side: int = 256
    tiny_backbone: str = "maskclip-test"
    tiny_images: int = 12  # tiny model at the paper's augmentation scale (also run at 2x)
    stride: int = 24
    encodings: list[str] = field(default_factory=lambda: ["float16", "float32", "int8"])
    workdir: Optional[str] = None  # default: a temporary directory
    out: Optional[str] = None


def _job_vs_bare(backbone: str, n: int, augment, stride: int, work: str) -> tuple[dict, list[torch.Tensor]]:
    """The cache job on the first `n` and on the first `2n` synthetic images (same keys, so the same
    views), then the bare teacher on every stored image. The difference of the two job times is the
    job's steady-state cost of images n..2n-1 (Ray and actor start-up cancel out); the rest is the
    fixed start-up cost."""
    from pipeline.cache.reader import open_cache

    sizes = [(1500, 2250), (1024, 768), (900, 1600), (1200, 1200)]
    job_s = {}
    for count in (n, 2 * n):
        out, job_s[count] = synthetic_cache(work, f"cache-{count}", backbone=backbone, count=count, sizes=sizes,
                                            stride=stride, augment=augment)
    cache = open_cache(out)
    first = set(open_cache(storage.join(work, f"cache-{n}")).keys())
    bb = spar.load_backbone(backbone, pretrained=None)
    maps, bare_extra, windows_extra = [], 0.0, 0
    for sample in cache:
        t = time.perf_counter()
        maps.append(spar.sliding_window_features(bb, bb.normalize(torch.from_numpy(sample["image"])), stride=stride)[0])
        if sample["key"] not in first:
            bare_extra += time.perf_counter() - t
            windows_extra += sample["meta"]["windows"]
    steady = job_s[2 * n] - job_s[n]
    return {
        "backbone": backbone, "images": 2 * n, "job_s": job_s[2 * n], "fixed_startup_s": job_s[n] - steady,
        "steady_images": n, "steady_windows": windows_extra, "job_steady_s": steady, "bare_teacher_s": bare_extra,
        "job_windows_per_s": windows_extra / steady, "bare_windows_per_s": windows_extra / bare_extra,
        "job_images_per_s": n / steady, "steady_overhead": steady / bare_extra - 1,
    }, maps


def encoding_costs(maps: list[torch.Tensor], encodings: list[str]) -> dict:
    """Bytes per token and error against float32 of each encoding, over real teacher maps."""
    import numpy as np

    from pipeline.cache.encode import dequantize, quantize
    from pipeline.codecs import npy_bytes

    out = {}
    for enc in encodings:
        nbytes, tokens, err, ref_norm, cos_min = 0, 0, 0.0, 0.0, 1.0
        for m in maps:
            q = {k: v.numpy() for k, v in quantize(m, enc).items()}
            nbytes += sum(len(npy_bytes(v)) for v in q.values())
            tokens += m.shape[0] * m.shape[1]
            back = torch.from_numpy(dequantize(q["target"], q.get("target_scale")))
            err += float((back - m).square().sum())
            ref_norm += float(m.square().sum())
            cos_min = min(cos_min, float(torch.nn.functional.cosine_similarity(back, m, dim=-1).min()))
        out[enc] = {"bytes_per_token": nbytes / tokens, "rel_l2_error": float(np.sqrt(err / ref_norm)),
                    "min_token_cosine": cos_min}
    return out


def bench_cache(cfg: CacheBench) -> dict:
    """Cache job vs bare teacher for a real-size and a tiny model, plus encoding costs."""
    import tempfile

    from pipeline.cache.augment import AugmentConfig

    with tempfile.TemporaryDirectory(dir=cfg.workdir) as work:
        big, maps = _job_vs_bare(cfg.backbone, cfg.images, AugmentConfig(scale=cfg.scale, min_side=cfg.min_side),
                                 cfg.stride, storage.join(work, cfg.backbone))
        tiny, _ = _job_vs_bare(cfg.tiny_backbone, cfg.tiny_images, AugmentConfig(), cfg.stride,
                               storage.join(work, cfg.tiny_backbone))
    return {"mode": "cache", "device": device_name(torch.device("cpu")), "threads": torch.get_num_threads(),
            "stride": cfg.stride, "real_model": big, "tiny_model": tiny,
            "encodings_dim": int(maps[0].shape[-1]), "encodings": encoding_costs(maps, cfg.encodings)}
