"""The teacher stage: a callable class that holds the ViT (the Ray Data batch-inference pattern).

One actor per GPU on GPU clusters (fractional CPUs locally). Each call receives a batch of
augmented images of any sizes; their windows are batched together through the ViT
(`spar.sliding_window_features_many`), and targets are quantised on the device before they
leave it, so only the cache encoding travels through the object store.
"""
from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import torch

import spar
from spar.weights import verified_weights
from pipeline.devices import pick_device, use_compute_dtype
from pipeline.storage import Storage
from pipeline.cache.encode import IMAGE_MEMBER, META_EXT, SCALE_EXT, TARGET_EXT, encode_members, quantize

log = logging.getLogger(__name__)

MEMBER_COLUMNS = (IMAGE_MEMBER, TARGET_EXT, SCALE_EXT, META_EXT)  # tar members, as output columns


class TeacherActor:
    """``batch -> batch``: the tar members of every row without an error (one column per member)."""

    def __init__(self, *, backbone: str, pretrained: str | None, crop: int | None, stride: int,
                 window_batch: int, compute_dtype: str, encoding: str, image_ext: str, compile: bool = False,
                 device: str = "auto", threads: int | None = None, fingerprint: str = "", init_seed: int = 0,
                 weights: dict | None = None, store: Storage | None = None):
        self.device = pick_device(device)
        if self.device.type == "cpu":
            # Ray pins OMP_NUM_THREADS to the actor's (fractional) CPU share; the teacher wants the cores.
            torch.set_num_threads(threads or os.cpu_count() or 1)
        store = store or Storage()
        options = store.weights_options(pretrained or "")
        if weights:  # the fingerprint's weights identity: this node loads the recorded file, or refuses
            # fetched once per node, under the storage's retry policy
            pretrained = store.call("weights", pretrained or "", lambda: verified_weights(pretrained, weights, options))
        self.bb = spar.load_backbone(backbone, pretrained=pretrained, init_seed=init_seed,
                                     storage_options=options).drop_text_tower()
        self.bb.to(self.device)
        self.crop = crop or self.bb.window
        self.stride, self.encoding, self.image_ext, self.fingerprint = stride, encoding, image_ext, fingerprint
        self.amp = use_compute_dtype(compute_dtype, self.device)
        self.window_batch = window_batch or spar.default_window_batch(self.bb, self.crop, self.device, self.amp)
        self.forward = spar.CompiledWindows(self.bb, self.window_batch) if compile else None
        log.info("teacher %s on %s (%d threads), %s, %d windows per forward%s", backbone, self.device,
                 torch.get_num_threads(), compute_dtype, self.window_batch, ", compiled" if compile else "")

    def _refuse(self, image: np.ndarray) -> str:
        h, w = image.shape[:2]
        p = self.bb.patch_size
        if h < self.crop or w < self.crop:
            return f"augmented image {h}x{w} is smaller than the teacher crop {self.crop}"
        if h % p or w % p:
            return f"augmented image {h}x{w} is not a multiple of the patch size {p}"
        return ""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["sample_key"])
        errors = [str(e) for e in batch["error"]]
        for i in range(n):
            if not errors[i]:
                errors[i] = self._refuse(batch["image"][i])
        todo = [i for i in range(n) if not errors[i]]
        cols = {name: [b""] * n for name in MEMBER_COLUMNS}
        windows = [0] * n
        t = time.perf_counter()
        if todo:
            # Ray hands out read-only views of the object store; normalize copies them anyway
            images = [self.bb.normalize(torch.from_numpy(np.array(batch["image"][i])))[0] for i in todo]
            maps = spar.sliding_window_features_many(self.bb, images, self.crop, self.stride,
                                                     self.window_batch, self.amp, forward=self.forward)
            for i, img, fmap in zip(todo, images, maps):
                target = {k: v.cpu().numpy() for k, v in quantize(fmap, self.encoding).items()}
                meta = json.loads(batch["meta"][i])
                windows[i] = spar.count_windows(img.shape[1], img.shape[2], self.crop, self.stride)
                meta.update(image_size=list(img.shape[1:]), grid=list(fmap.shape[:2]), dim=int(fmap.shape[2]),
                            encoding=self.encoding, dtype=str(target["target"].dtype), windows=windows[i],
                            teacher=self.fingerprint)
                members = encode_members(batch["sample_key"][i], batch[IMAGE_MEMBER][i], self.image_ext, target, meta)
                members[IMAGE_MEMBER] = members.pop(self.image_ext)
                for name in MEMBER_COLUMNS:
                    cols[name][i] = members.get(name, b"")
        seconds = (time.perf_counter() - t) / max(1, len(todo))
        return {
            "sample_key": batch["sample_key"], "source": batch["source"], "view": batch["view"],
            "error": np.array(errors, dtype=object), "lost": batch["lost"], "retries": batch["retries"],
            **{name: np.array(values, dtype=object) for name, values in cols.items()},
            "windows": np.array(windows, dtype=np.int64),
            "teacher_s": np.full(n, seconds if todo else 0.0),
        }
