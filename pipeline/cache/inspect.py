"""What a teacher cache holds (`jobs/inspect_cache.py`): a summary, a contact sheet of feature
pictures, and an audit that recomputes stored targets.

    summary          counts and bytes from the manifest; member sizes, the encoding's error bound,
                     size and window histograms, errors by reason, the fingerprint in words, and
                     the cache jobs writing to it now (their leases)
    contact sheet    per shown sample: the image, the teacher target as a 3-component PCA mapped to
                     RGB, the pre-trained single pass in the *same* basis (and a student's, if given),
                     each labelled with its key and MSE to the teacher
    audit            `recompute=N`: the fingerprint's teacher rerun on N stored images; each stored
                     target's error against the recomputed one, next to the bound its encoding and
                     compute dtype promise (beyond it: `AuditMismatch`, naming the sample)

Only the shown samples are read: shards are taken in a seeded order and streamed until enough
samples have come out.
"""
from __future__ import annotations

import collections
import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

import spar
from spar.weights import verified_weights
from pipeline import storage
from pipeline.cache import shards
from pipeline.cache.encode import decode_members
from pipeline.cache.reader import Cache, iter_raw_shard, open_cache, shard_url, teacher_weights
from pipeline.config import check, redacted_repr, resolve_paths, resolve_weights
from pipeline.devices import AMP_DTYPES, pick_device
from pipeline.storage import Storage

log = logging.getLogger(__name__)

# Relative L2 error ||stored - recomputed|| / ||recomputed|| a target may have: its encoding's rounding
# plus what another machine's kernels and thread counts change at the cache's compute dtype.
ENCODING_BOUND = {"float32": 1e-6, "float16": 2e-3, "int8": 2e-2}
COMPUTE_BOUND = {"float32": 1e-3, "tf32": 1e-2, "float16": 1e-2, "bfloat16": 5e-2}
PANEL = 160  # contact-sheet panel side, pixels
LABEL = 18  # label strip above each row


class AuditMismatch(RuntimeError):
    """A stored target differs from the recomputed teacher beyond its bound."""


@dataclass(kw_only=True)
class InspectConfig:
    """`jobs/inspect_cache.py`: summary, contact sheet and (optionally) an audit of a teacher cache."""

    cache: str = ""  # the cache URL (required)
    samples: int = 8  # samples on the contact sheet
    student: Optional[str] = None  # a student.safetensors to show beside the single pass (local or URL)
    recompute: int = 0  # audit: rerun the teacher on this many stored images
    output: str = "out/inspect"  # summary.json, summary.txt, contact_sheet.png, audit.json
    seed: int = 0  # which shards are shown
    device: str = "auto"
    window_batch: int = 64  # audit: teacher windows per forward
    storage_options: dict[str, Any] = field(default_factory=dict)

    __repr__ = redacted_repr  # without storage_options' secrets, wherever a config is printed

    def __post_init__(self):
        check(bool(self.cache), "cache=<url of a teacher cache> is required")
        check(self.samples >= 1 and self.recompute >= 0, "samples must be >= 1 and recompute >= 0")
        resolve_paths(self, "cache", "output")
        self.student = resolve_weights(self.student)


def summarize(cache: Cache, shown: list[dict]) -> dict:
    """The cache in numbers (manifest totals; member sizes measured on the `shown` raw samples)."""
    m, fp = cache.manifest, cache.fingerprint
    sizes = collections.Counter(zip(m.column("height").to_pylist(), m.column("width").to_pylist()))
    windows = np.array(m.column("windows").to_pylist())
    edges = np.unique(np.quantile(windows, np.linspace(0, 1, 6)).round()) if len(windows) else np.array([0])
    counts, edges = np.histogram(windows, bins=edges if len(edges) > 1 else 1)
    members = collections.defaultdict(list)
    for raw in shown:
        for ext, data in raw.items():
            if not ext.startswith("__"):
                members[ext].append(len(data))
    errors = collections.Counter(str(r).split(":")[0] for r in cache.errors.column("reason").to_pylist())
    total_bytes = int(sum(cache.shards.column("bytes").to_pylist()))
    encoding, dtype = fp["encoding"], fp["compute_dtype"]
    return {
        "cache": storage.public_url(cache.url), "manifest_version": cache.version,
        "samples": len(cache), "shards": cache.shards.num_rows, "bytes": total_bytes,
        "bytes_per_sample": total_bytes / max(len(cache), 1),
        "target_bytes_per_sample": float(np.mean(m.column("target_bytes").to_pylist())) if len(cache) else 0.0,
        "member_bytes_per_sample": {ext: float(np.mean(v)) for ext, v in sorted(members.items())},
        "member_bytes_measured_on": len(shown),
        "image_sizes": {f"{h}x{w}": n for (h, w), n in sizes.most_common(10)},
        "distinct_image_sizes": len(sizes),
        "windows_per_image": {f"{int(a)}-{int(b)}": int(n) for a, b, n in zip(edges[:-1], edges[1:], counts)},
        "encoding": encoding, "compute_dtype": dtype,
        "target_error_bound": {"relative_l2": ENCODING_BOUND[encoding],
                               "meaning": f"{encoding} storage of {dtype} teacher features"},
        "errors": dict(errors), "failed_inputs": cache.errors.num_rows,
        "fingerprint": {
            "digest": fp["fingerprint"], "backbone": fp["backbone"], "weights": fp["weights"],
            "window": fp["crop"], "stride": fp["stride"], "patch_size": fp["patch_size"], "dim": fp["dim"],
            "augmentation": fp["augmentation"], "project_version": fp.get("project_version"),
        },
    }


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def summary_text(s: dict) -> str:
    fp = s["fingerprint"]
    lines = [
        f"cache {s['cache']} (manifest version {s['manifest_version']})",
        f"  {s['samples']} samples in {s['shards']} shards, {_size(s['bytes'])} "
        f"({_size(s['bytes_per_sample'])} per sample, of which the target {_size(s['target_bytes_per_sample'])})",
        "  per member (measured on " + str(s["member_bytes_measured_on"]) + " samples): "
        + ", ".join(f"{k} {_size(v)}" for k, v in s["member_bytes_per_sample"].items()),
        f"  teacher: {fp['backbone']} ({fp['weights'].get('kind')} {fp['weights'].get('value')}), window "
        f"{fp['window']}, stride {fp['stride']}, patch {fp['patch_size']}, {fp['dim']}-d features",
        f"  targets: {s['encoding']} of {s['compute_dtype']} features, relative L2 error bound "
        f"{s['target_error_bound']['relative_l2']:g}",
        f"  image sizes ({s['distinct_image_sizes']} distinct): "
        + ", ".join(f"{k} x{n}" for k, n in s["image_sizes"].items()),
        "  windows per image: " + ", ".join(f"{k}: {n}" for k, n in s["windows_per_image"].items()),
        f"  failed inputs: {s['failed_inputs']}" + (f" ({s['errors']})" if s["errors"] else ""),
        f"  fingerprint {fp['digest']}",
    ]
    return "\n".join(lines)


def pick_samples(cache: Cache, n: int, seed: int) -> list[dict]:
    """`n` raw samples (tar members by extension): shards in a seeded order, each streamed until
    enough have come out (only what is shown is read)."""
    order = np.random.default_rng(seed).permutation(cache.shards.num_rows)
    names = cache.shards.column("shard").to_pylist()
    committed, out = set(cache.keys()), []
    for i in order:
        for raw in iter_raw_shard(shard_url(cache.url, names[i]), cache.store, keep=committed.__contains__):
            out.append(raw)
            if len(out) == n:
                return out
    return out


def teacher_backbone(fp: dict, store: Storage, device: torch.device) -> spar.Backbone:
    """The cache's teacher with its weights (an open_clip tag, a file, or the recorded random init)."""
    location, init_seed = teacher_weights(fp)
    options = store.weights_options(location or "")
    local = store.call("weights", location or "", lambda: verified_weights(location, fp["weights"], options))
    return spar.load_backbone(fp["backbone"], pretrained=local, init_seed=init_seed, storage_options=options,
                              device=device)


def _pca_rgb(maps: list[torch.Tensor], basis_of: torch.Tensor) -> list[np.ndarray]:
    """Every (h, w, D) map projected on the top 3 principal components of `basis_of`'s tokens,
    scaled by `basis_of`'s 1st-99th percentiles to RGB (uint8)."""
    x = basis_of.reshape(-1, basis_of.shape[-1]).float()
    mean = x.mean(0)
    _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
    comps = v[:3].T
    ref = (x - mean) @ comps
    lo, hi = torch.quantile(ref, 0.01, dim=0), torch.quantile(ref, 0.99, dim=0)
    out = []
    for m in maps:
        p = ((m.reshape(-1, m.shape[-1]).float() - mean) @ comps - lo) / (hi - lo).clamp_min(1e-12)
        out.append((p.clamp(0, 1).reshape(*m.shape[:2], 3).numpy() * 255).astype(np.uint8))
    return out


def _panel(rgb: np.ndarray):
    """An image letterboxed into a PANEL x PANEL square (features upsampled with nearest pixels)."""
    from PIL import Image

    img = Image.fromarray(rgb)
    scale = PANEL / max(img.size)
    size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
    img = img.resize(size, Image.NEAREST if rgb.shape[0] < 200 and rgb.shape[1] < 400 else Image.BILINEAR)
    box = Image.new("RGB", (PANEL, PANEL), (255, 255, 255))
    box.paste(img, ((PANEL - size[0]) // 2, (PANEL - size[1]) // 2))
    return box


def contact_sheet(samples: list[dict], teacher: spar.Backbone, student: spar.Backbone | None,
                  device: torch.device) -> tuple[bytes, list[dict]]:
    """(PNG bytes, per-row numbers) of decoded `samples`: image | teacher | single pass | [student]."""
    from PIL import Image, ImageDraw

    columns = ["image", "teacher target", "single pass"] + (["student"] if student is not None else [])
    sheet = Image.new("RGB", (PANEL * len(columns), LABEL + len(samples) * (PANEL + LABEL)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(columns):
        draw.text((c * PANEL + 4, 3), name, fill=(0, 0, 0))
    rows = []
    for r, s in enumerate(samples):
        target = torch.from_numpy(s["target"])
        x = teacher.normalize(torch.from_numpy(s["image"]).to(device))
        with torch.no_grad():
            maps = [target, teacher.dense(x)[0].float().cpu()]
            if student is not None:
                maps.append(student.dense(x)[0].float().cpu())
        mse = [float(spar.feature_loss(m[None], target[None])) for m in maps[1:]]
        rgb = _pca_rgb(maps, target)
        y = LABEL + r * (PANEL + LABEL)
        label = f"{s['key']}  single-pass MSE {mse[0]:.4g}" + (f"  student MSE {mse[1]:.4g}" if student else "")
        draw.text((4, y + 3), label, fill=(0, 0, 0))
        for c, panel in enumerate([s["image"], *rgb]):
            sheet.paste(_panel(panel), (c * PANEL, y + LABEL))
        rows.append({"key": s["key"], "single_pass_mse": mse[0], **({"student_mse": mse[1]} if student else {})})
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue(), rows


def audit(samples: list[dict], teacher: spar.Backbone, fp: dict, window_batch: int) -> list[dict]:
    """Each stored target against the teacher recomputed on its stored pixels."""
    bound = ENCODING_BOUND[fp["encoding"]] + COMPUTE_BOUND[fp["compute_dtype"]]
    out = []
    for s in samples:
        image = teacher.normalize(torch.from_numpy(s["image"]).to(next(teacher.parameters()).device))[0]
        with torch.no_grad():
            fresh = spar.sliding_window_features_many(teacher, [image], fp["crop"], fp["stride"], window_batch,
                                                      AMP_DTYPES[fp["compute_dtype"]])[0].float().cpu()
        stored = torch.from_numpy(s["target"]).float()
        diff = stored - fresh
        rel_l2 = float(diff.norm() / fresh.norm().clamp_min(1e-12))
        cos = torch.nn.functional.cosine_similarity(stored.reshape(-1, stored.shape[-1]),
                                                    fresh.reshape(-1, fresh.shape[-1]), dim=1)
        out.append({"key": s["key"], "max_abs": float(diff.abs().max()), "relative_mse": rel_l2 ** 2,
                    "relative_l2": rel_l2, "min_token_cosine": float(cos.min()), "bound_relative_l2": bound,
                    "ok": rel_l2 <= bound})
    return out


def run(cfg: InspectConfig) -> dict:
    """Write summary.json / summary.txt / contact_sheet.png (and audit.json) to `cfg.output`."""
    store = Storage(cfg.storage_options)
    cache = open_cache(cfg.cache, store)
    raws = pick_samples(cache, max(cfg.samples, cfg.recompute), cfg.seed)
    decoded = [decode_members(r) for r in raws]
    summary = summarize(cache, raws)
    now = time.time()
    summary["writing_now"] = [  # cache jobs running on it (their leases), read only
        {"run": w["run"], "host": w.get("host"), "pid": w.get("pid"), "running_s": round(now - w["started"]),
         "renewed_s_ago": round(now - w["renewed"])}
        for w in shards.live_writers(store, cache.url, now, remove_expired=False)]
    device = pick_device(cfg.device)
    teacher = teacher_backbone(cache.fingerprint, store, device).eval()
    student = None
    if cfg.student:
        student = spar.load_backbone(cache.fingerprint["backbone"], pretrained=cfg.student, device=device,
                                     storage_options=store.weights_options(cfg.student)).eval()
    png, rows = contact_sheet(decoded[: cfg.samples], teacher, student, device)
    store.write_bytes(storage.join(cfg.output, "contact_sheet.png"), png)
    summary["contact_sheet"] = {"path": storage.public_url(storage.join(cfg.output, "contact_sheet.png")),
                                "rows": rows}
    text = summary_text(summary) + "\n  cache jobs writing to it now: " + (", ".join(
        f"{w['run']} (on {w['host']}, for {w['running_s']} s, renewed {w['renewed_s_ago']} s ago)"
        for w in summary["writing_now"]) or "none")
    if cfg.recompute:
        results = audit(decoded[: cfg.recompute], teacher, cache.fingerprint, cfg.window_batch)
        summary["audit"] = results
        store.write_text(storage.join(cfg.output, "audit.json"), json.dumps(results, indent=2))
        text += "\n  audit (teacher recomputed on the stored pixels):\n" + "\n".join(
            f"    {r['key']}: relative L2 {r['relative_l2']:.3g} (bound {r['bound_relative_l2']:.3g}), max |diff| "
            f"{r['max_abs']:.3g}, min token cosine {r['min_token_cosine']:.5f} {'ok' if r['ok'] else 'MISMATCH'}"
            for r in results)
    store.write_text(storage.join(cfg.output, "summary.json"), json.dumps(summary, indent=2, default=str))
    store.write_text(storage.join(cfg.output, "summary.txt"), text + "\n")
    print(text)
    bad = [r for r in summary.get("audit", []) if not r["ok"]]
    if bad:
        raise AuditMismatch("stored targets differ from the recomputed teacher beyond their bound: "
                            + ", ".join(f"{r['key']} (relative L2 {r['relative_l2']:.3g} > {r['bound_relative_l2']:.3g})"
                                        for r in bad))
    return summary
