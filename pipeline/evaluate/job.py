"""Open-vocabulary segmentation evaluation (docs/method.md §5): one benchmark, one to three feature modes.

    python jobs/evaluate.py dataset=voc21 root=/data/VOCdevkit features=all checkpoint=<student>

Modes: ``single`` (one pass of the pre-trained model), ``sliding`` (the sliding-window teacher:
its feature map, or SCLIP-style averaged window logits), ``student`` (one pass of the SPAR
student, ``checkpoint=``), or ``all`` three. Every image goes through every requested mode in
turn, so the images/s of the modes are measured side by side. Results go to
``<output>/<backbone>/<dataset>/<mode>.json`` and the comparison tables of everything under
`output` (``table.md``, ``table.json``) are rebuilt after each run, so one command per dataset
fills in the paper's table.

``ray=true`` spreads the images over an actor pool (one GPU each, fractional CPUs on CPU-only
clusters); actors return per-image confusion matrices and the driver sums them.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import time
from typing import Any, Iterator

import numpy as np
import torch

from pipeline import storage
from pipeline.config import to_dict, to_yaml
from pipeline.storage import Storage
from pipeline.evaluate.datasets import DatasetSpec, Sample, class_source, get_dataset, list_samples, load_sample
from pipeline.evaluate.evaluator import EvalConfig, Evaluator, Totals, postprocess_settings
from pipeline.evaluate.tables import mode_label, write_tables
from spar.metrics import segmentation_scores

log = logging.getLogger(__name__)


def _prefetched(fn, items: list, depth: int) -> Iterator[tuple[Any, Any, BaseException | None]]:
    """(item, fn(item), error) in order, with up to `depth` calls running ahead in threads."""
    with concurrent.futures.ThreadPoolExecutor(max(1, min(depth, 4))) as pool:
        pending: collections.deque = collections.deque()
        it = iter(items)
        for item in it:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= max(1, depth):
                break
        while pending:
            item, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(fn, nxt)))
            try:
                yield item, fut.result(), None
            except Exception as e:  # decoding errors; the caller applies the skip policy
                yield item, None, e


def _run_local(cfg: EvalConfig, store: Storage, spec: DatasetSpec, samples: list[Sample]
               ) -> tuple[dict[str, Totals], list, tuple]:
    from tqdm import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ev = Evaluator(cfg, store)
    if cfg.warmup:
        ev.warmup()
    c = spec.num_classes
    totals = {m: Totals(np.zeros((c, c), dtype=np.int64), device=ev.device_name) for m in cfg.modes}
    skipped = []
    with torch.no_grad():
        for sample, loaded, error in tqdm(_prefetched(lambda s: load_sample(spec, s, store), samples, cfg.prefetch),
                                          total=len(samples), desc=f"{spec.name}", disable=None, mininterval=10):
            if error is not None:
                if not cfg.skip_bad:
                    raise error
                skipped.append({"key": sample.key, "reason": f"{type(error).__name__}: {error}"})
                continue
            for mode, (cm, seconds) in ev(*loaded).items():
                totals[mode].add(cm, seconds)
    return totals, skipped, ev.class_names


def run(cfg: EvalConfig) -> dict:
    """Evaluate, write the per-mode results and the comparison tables; returns the results."""
    store = Storage(cfg.storage_options)
    spec = get_dataset(cfg.dataset)
    samples = list_samples(spec, cfg.root, cfg.split, store)
    listed = len(samples)
    samples = samples[: cfg.limit]
    log.info("%s/%s: %d of %d images, modes %s, backbone %s", spec.name, cfg.split, len(samples), listed,
             cfg.modes, cfg.backbone)
    t0 = time.perf_counter()
    if cfg.ray:
        from pipeline.evaluate.fanout import run_ray

        totals, skipped, class_names = run_ray(cfg, store, spec, samples)
    else:
        totals, skipped, class_names = _run_local(cfg, store, spec, samples)
    wall = time.perf_counter() - t0
    results = {m: _result(cfg, spec, m, t, class_names, listed, skipped, wall) for m, t in totals.items()}
    run_dir = storage.join(cfg.output, cfg.backbone, spec.name)
    store.write_text(storage.join(run_dir, "config.yaml"), to_yaml(cfg))
    for r in results.values():
        store.write_text(storage.join(run_dir, f"{r['label']}.json"), _json(r))
    tables = write_tables(cfg.output, store)
    for r in results.values():
        log.info("%s %s: mIoU %.2f over %d images, %.3g images/s", spec.name, r["label"], r["miou"] or 0.0,
                 r["images"], r["images_per_s"])
    return {"dataset": spec.name, "results": results, "table": tables["markdown"]}


def _result(cfg: EvalConfig, spec: DatasetSpec, mode: str, t: Totals, class_names, listed: int,
            skipped: list, wall: float) -> dict:
    weights = cfg.checkpoint if mode == "student" else cfg.pretrained
    return {
        "dataset": spec.name, "title": spec.title, "split": cfg.split, "backbone": cfg.backbone, "mode": mode,
        "label": mode_label(mode, cfg.sliding_mode, cfg.stride), "weights": storage.public_url(weights),
        "classes": storage.public_url(class_source(spec.name, cfg.classes)),
        **segmentation_scores(torch.from_numpy(t.confusion), class_names),
        "images": t.images, "images_listed": listed, "skipped": skipped,
        "seconds": t.seconds, "images_per_s": t.images / t.seconds if t.seconds else 0.0, "wall_seconds": wall,
        "median_seconds_per_image": float(np.median(t.per_image)) if t.per_image else None,
        "device": t.device,
        "ray": cfg.ray, "scale": list(cfg.scale or spec.scale),
        "postprocess": vars(postprocess_settings(cfg, spec)),
        "sliding": {"mode": cfg.sliding_mode, "stride": cfg.stride, "crop": cfg.crop} if mode == "sliding" else None,
        "amp_dtype": cfg.amp_dtype, "config": to_dict(cfg),
    }


def _json(obj: dict) -> str:
    import json

    return json.dumps(obj, indent=2)
