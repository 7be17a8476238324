"""The end of a run: the trained student as a plain open_clip state dict, and its record.

``student.safetensors`` is the fp32 master weights of the trainable parameters over the teacher's
frozen ones; ``student.json`` says where it came from (backbone, weights, cache fingerprint,
config), how it ended (steps, loss), and that every rank holds the same weights (per-rank digests);
``probe_features.npy`` is the in-job feature map of one cached image, which the exported file must
reproduce.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time

import numpy as np
import torch

import spar
from pipeline import storage
from pipeline.codecs import npy_bytes
from pipeline.config import to_dict
from pipeline.storage import Storage
from pipeline.train.collectives import all_gather_str
from pipeline.train.checkpoint import full_weights

log = logging.getLogger(__name__)


def gather_trained(engine, keep: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the fp32 trainable weights if `keep`, else {}; every rank's sha256 digest of its copy).
    Every rank must call it: under ZeRO the full weights are gathered collectively."""
    weights, digest = full_weights(engine), hashlib.sha256()  # a collective under ZeRO: every rank calls it
    for value in weights.values():
        digest.update(value.numpy().tobytes())
    return (weights if keep else {}), all_gather_str(digest.hexdigest()[:16])


def probe_features(engine, probe: dict, device: torch.device) -> torch.Tensor:
    """The engine's feature map of one cached image, as the run computes it."""
    with torch.no_grad(), spar.student.eval_mode(engine.module):  # as the exported model runs
        x = engine.module.normalize(torch.from_numpy(probe["image"]).to(device))
        return engine(x).float().cpu()


def write_student(store: Storage, run_dir: str, source: dict, trainable: str, trained: dict, record: dict,
                  probe: dict, in_job: torch.Tensor) -> dict:
    """Write ``student.safetensors`` (trained weights over a fresh teacher), the probe features and
    ``student.json`` (`record` plus the model and probe fields); returns the record."""
    fresh = spar.load_backbone(source["backbone"], pretrained=source["pretrained"], init_seed=source["init_seed"],
                               storage_options=store.weights_options(source["pretrained"] or ""))
    with torch.no_grad():
        for name, value in trained.items():
            fresh.get_parameter(name).copy_(value)
        exported = fresh.dense(fresh.normalize(torch.from_numpy(probe["image"])))
    with tempfile.TemporaryDirectory() as tmp:
        path = spar.export_open_clip(fresh, os.path.join(tmp, "student.safetensors"))
        store.upload(str(path), storage.join(run_dir, "student.safetensors"))
    store.write_bytes(storage.join(run_dir, "probe_features.npy"), npy_bytes(in_job.numpy()))
    info = {"backbone": source["backbone"], "model_name": fresh.model_name, "weights": source["weights"],
            "trainable": spar.trainable_parameter_names(fresh, trainable),
            **record, "probe_key": probe["key"], "probe_max_abs_diff": float((exported - in_job).abs().max()),
            "created": time.time()}
    store.write_text(storage.join(run_dir, "student.json"),
                       json.dumps(info, indent=2, default=lambda o: np.asarray(o).tolist()))
    log.info("exported %s (probe max |diff| vs in-job features: %.3g)",
             storage.public_url(storage.join(run_dir, "student.safetensors")), info["probe_max_abs_diff"])
    return info


def run_record(cfg, fingerprint: dict, state, final_loss: float, digests: list[str], nodes: list[str],
               ds_config: dict, precision: str, caches: list | None = None, table=None) -> dict:
    """The run's fields of ``student.json``: `ds_config` and `precision` are what the ranks resolved
    and ran (`pipeline.train.engine.worker_precision`), not the driver's view. A mixture lists its
    `caches` (each one's URL, pinned version, fingerprint, training samples and draws per epoch)."""
    mixture = {}
    if caches and len(caches) > 1:
        sizes = table.cache_sizes().tolist()
        drawn = sizes if table.draw is None else table.draw.tolist()
        mixture = {"caches": [{"url": storage.public_url(c.url), "version": c.version,
                               "fingerprint": c.fingerprint["fingerprint"], "training_samples": n,
                               "samples_per_epoch": d} for c, n, d in zip(caches, sizes, drawn)]}
        if state.val_by_cache:
            mixture["validation_by_cache"] = state.val_by_cache
    return {
        "cache": storage.public_url(cfg.cache) if isinstance(cfg.cache, str) else
        [storage.public_url(u) for u in cfg.cache],
        "cache_fingerprint": fingerprint["fingerprint"],
        "cache_version": state.cache_version, **mixture,
        "steps": state.step, "epochs_completed": state.epoch, "final_loss": final_loss,
        "precision": precision,  # bf16 | fp16 | fp32, as the ranks resolved it
        "rank_weight_digests": digests,  # sha256 of each rank's fp32 trainable weights: all equal
        "rank_nodes": nodes,  # Ray node id of each rank
        "config": to_dict(cfg),
        "deepspeed": ds_config,  # the DeepSpeed config that ran (generated, with the user's JSON merged over it)
        "validation": {**(state.validation or {}), "mse": state.val_mse, "baseline_mse": state.val_baseline,
                       "ratio": (state.val_mse / state.val_baseline) if state.val_baseline else None},
    }
