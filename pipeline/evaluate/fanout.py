"""The evaluation spread over a Ray cluster: an actor pool scores images, the driver sums.

Samples (URLs only) become a Ray dataset; `EvalActor` (one per GPU; fractional CPUs on
CPU-only clusters, whose whole-CPU actors deadlock Ray Data on small hosts) reads, decodes and
scores one image per call with the same `Evaluator` as the local path, and returns that image's
confusion matrix per mode. Summing per-image matrices on the driver is exact whatever the order,
and a retried batch emits its rows once, so a restarted actor cannot double-count an image.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import torch

from pipeline.storage import Storage
from pipeline.evaluate.datasets import (DatasetError, DatasetSpec, Sample, class_source, display_names,
                                        load_class_lines, load_sample)
from pipeline.devices import pick_device
from pipeline.evaluate.evaluator import EvalConfig, Evaluator, Totals
from spar.text import parse_class_lines

log = logging.getLogger(__name__)


class EvalActor:
    """``batch of samples -> batch``: key, error, and per mode ``cm_<mode>`` (C*C,) and ``s_<mode>`` seconds."""

    def __init__(self, *, cfg: EvalConfig, store: Storage):
        self.store = store
        if pick_device(cfg.device).type == "cpu":
            # Ray pins OMP_NUM_THREADS to the actor's (fractional) CPU share; inference wants the cores.
            torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
        self.ev = Evaluator(cfg, store)
        if cfg.warmup:
            self.ev.warmup()
        self.cfg = cfg
        log.info("eval actor on %s", self.ev.device_name)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, c, modes = len(batch["key"]), self.ev.spec.num_classes, self.cfg.modes
        cms = {m: np.zeros((n, c * c), dtype=np.int64) for m in modes}
        secs = {m: np.zeros(n) for m in modes}
        errors = [""] * n
        for i in range(n):
            sample = Sample(str(batch["key"][i]), str(batch["image"][i]), str(batch["label"][i]),
                            str(batch["label_format"][i]))
            try:
                image, label = load_sample(self.ev.spec, sample, self.store)
            except (DatasetError, OSError) as e:
                if not self.cfg.skip_bad:
                    raise
                errors[i] = f"{type(e).__name__}: {e}"
                continue
            with torch.no_grad():
                for mode, (cm, seconds) in self.ev(image, label).items():
                    cms[mode][i], secs[mode][i] = cm.reshape(-1), seconds
        return {"key": batch["key"], "error": np.array(errors, dtype=object),
                "device": np.array([self.ev.device_name] * n, dtype=object),
                **{f"cm_{m}": cms[m] for m in modes}, **{f"s_{m}": secs[m] for m in modes}}


def run_ray(cfg: EvalConfig, store: Storage, spec: DatasetSpec, samples: list[Sample]
            ) -> tuple[dict[str, Totals], list, tuple]:
    """Score `samples` on an actor pool; (totals per mode, skipped samples, class names)."""
    import ray

    from pipeline.ray_utils import actor_pool, init_ray, require_on_every_node

    lines = load_class_lines(class_source(spec.name, cfg.classes), store)
    names = display_names(spec, [c[0] for c in parse_class_lines(lines)])
    c = spec.num_classes
    totals = {m: Totals(np.zeros((c, c), dtype=np.int64)) for m in cfg.modes}
    skipped = []
    started = init_ray(cfg.ray_address, cfg.num_cpus)
    try:
        require_on_every_node(cfg.root, "the dataset root")
        pool = actor_pool(device=cfg.device, num_gpus=cfg.actor_gpus, num_cpus=cfg.actor_cpus, num_actors=cfg.num_actors,
                          min_actors=cfg.min_actors, max_actors=cfg.max_actors, cpu_actors=1)
        log.info("evaluation: %s", pool.describe())
        items = [dataclasses.asdict(s) for s in samples]
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 1000)))
        ds = ds.map_batches(EvalActor, batch_size=1, batch_format="numpy", compute=pool.strategy(),
                            num_gpus=pool.num_gpus, num_cpus=pool.num_cpus,
                            fn_constructor_kwargs={"cfg": cfg, "store": store})
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["key"])):
                if batch["error"][i]:
                    skipped.append({"key": str(batch["key"][i]), "reason": str(batch["error"][i])})
                    continue
                for m in cfg.modes:
                    totals[m].add(batch[f"cm_{m}"][i], float(batch[f"s_{m}"][i]))
                    totals[m].device = str(batch["device"][i])
    finally:
        if started:
            ray.shutdown()
    return totals, skipped, names
