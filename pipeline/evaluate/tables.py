"""The paper-style comparison table, rebuilt from every result under an evaluation output.

Each run of `jobs/evaluate.py` writes ``<output>/<backbone>/<dataset>/<mode label>.json``; this
module gathers them into one row per (backbone, feature mode) with a column per dataset, the
mean over the datasets the row has, the paper's six-benchmark mean (docs/method.md §6) for reference,
the class list each column used (``paper:voc21``, ``curated:voc21`` or a class file), and a second
table of images/s. Written as ``table.md`` and ``table.json`` under the output.
"""
from __future__ import annotations

import json
import logging
import posixpath

from pipeline import storage
from pipeline.storage import Storage
from pipeline.evaluate.datasets import CLASS_LISTS, DATASETS

log = logging.getLogger(__name__)

# docs/method.md §6: mean mIoU over the six benchmarks.
PAPER_MEAN = {
    ("maskclip", "single"): 27.7, ("maskclip", "sliding"): 33.6, ("maskclip", "student"): 34.4,
    ("siglip2", "single"): 33.1, ("siglip2", "sliding"): 41.2, ("siglip2", "student"): 43.6,
    ("dinov3txt", "single"): 43.8, ("dinov3txt", "sliding"): 44.0, ("dinov3txt", "student"): 44.4,
}
_MODE_ORDER = {"single": 0, "sliding": 1, "student": 2}


def mode_label(mode: str, sliding_mode: str = "feature", stride: int = 24) -> str:
    """File / row label of a feature mode: ``single``, ``student``, ``sliding-feature-s24``..."""
    return f"sliding-{sliding_mode}-s{stride}" if mode == "sliding" else mode


def describe(result: dict) -> str:
    """Human row title of a result's mode."""
    if result["mode"] == "sliding":
        s = result.get("sliding") or {}
        return f"sliding teacher ({s.get('mode', 'feature')}, s={s.get('stride', '?')})"
    return {"single": "single pass", "student": "SPAR student"}.get(result["mode"], result["mode"])


def collect_results(output: str, store: Storage) -> list[dict]:
    """Every per-mode result JSON under ``<output>/<backbone>/<dataset>/``."""
    found = []
    for url in store.list_files(output, suffixes=(".json",)):
        rel = store.relative(url, output)
        if rel.count("/") != 2 or posixpath.basename(posixpath.dirname(rel)) not in DATASETS:
            continue
        try:
            r = json.loads(store.read_text(url))
        except (OSError, ValueError) as e:
            log.warning("skipping unreadable result %s: %s", url, e)
            continue
        if isinstance(r, dict) and {"dataset", "label", "miou", "backbone", "mode"} <= set(r):
            found.append(r)
    return found


def _fmt(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _speed(v: float | None) -> str:
    return "–" if not v else (f"{v:.3g}" if v < 100 else f"{v:.0f}")


def build_tables(results: list[dict]) -> dict:
    """{"markdown": str, "json": dict} of the comparison tables for `results`."""
    datasets = [d for d in DATASETS if any(r["dataset"] == d for r in results)]
    rows: dict[tuple[str, str], dict] = {}
    for r in sorted(results, key=lambda r: (r["backbone"], _MODE_ORDER.get(r["mode"], 9), r["label"])):
        row = rows.setdefault((r["backbone"], r["label"]), {
            "backbone": r["backbone"], "label": r["label"], "mode": r["mode"], "features": describe(r),
            "miou": {}, "images_per_s": {}, "images": {}, "classes": {}, "partial": [], "device": r.get("device", ""),
            "paper_mean": PAPER_MEAN.get((r["backbone"], r["mode"]))})
        row["miou"][r["dataset"]] = r["miou"]
        row["images_per_s"][r["dataset"]] = r.get("images_per_s")
        row["images"][r["dataset"]] = r.get("images")
        row["classes"][r["dataset"]] = r.get("classes")  # absent in results written before lists were recorded
        if r.get("images", 0) < r.get("images_listed", 0) or r.get("skipped"):
            row["partial"].append(r["dataset"])
    for row in rows.values():
        vals = [v for v in row["miou"].values() if v is not None]
        row["mean"] = sum(vals) / len(vals) if vals else None
        row["datasets_in_mean"] = len(vals)
    table = {"datasets": datasets, "rows": list(rows.values())}
    return {"markdown": _markdown(table), "json": table}


def _list_name(source: str | None) -> str:
    """Table cell of a class source: the packaged list's name (``paper``, ``curated``) or the file."""
    if source is None:
        return "unrecorded"
    class_list, _, name = source.rpartition(":")
    return class_list if name in DATASETS and class_list in CLASS_LISTS else source


def _classes_cell(row: dict, datasets: list[str]) -> str:
    """One name when every column of the row used the same kind of list, else one per column."""
    names = {d: _list_name(row["classes"][d]) for d in datasets if d in row["classes"]}
    if len(set(names.values())) == 1:
        return next(iter(names.values()))
    return "; ".join(f"{DATASETS[d].title}: {n}" for d, n in names.items())


def _markdown(table: dict) -> str:
    datasets, rows = table["datasets"], table["rows"]
    titles = [DATASETS[d].title for d in datasets]
    n_all = len(DATASETS)
    lines = ["# Open-vocabulary segmentation", "",
             "mIoU (%), ignore index 255. `*` = evaluated on part of the split (`limit=` or skipped images); "
             f"mean = over the datasets the row has (k/{n_all} when not all six); paper = docs/method.md §6, "
             "mean of the six benchmarks; classes = the class lists: paper (the SCLIP / ClearCLIP / ProxyCLIP "
             "lists the paper uses, docs/method.md §5), curated, or a class file.", "",
             "| backbone | features | " + " | ".join(titles) + " | mean | paper | classes |",
             "|---|---|" + "---:|" * (len(titles) + 2) + "---|"]
    for row in rows:
        cells = [_fmt(row["miou"].get(d)) + ("*" if d in row["partial"] else "") for d in datasets]
        mean = _fmt(row["mean"]) + ("" if row["datasets_in_mean"] == n_all else f" ({row['datasets_in_mean']}/{n_all})")
        lines.append(f"| {row['backbone']} | {row['features']} | " + " | ".join(cells)
                     + f" | {mean} | {_fmt(row['paper_mean'], 1)} | {_classes_cell(row, datasets)} |")
    lines += ["", "Images per second (inference: resize, features, logits, post-processing; decoding excluded).", "",
              "| backbone | features | " + " | ".join(titles) + " | device |",
              "|---|---|" + "---:|" * len(titles) + "---|"]
    for row in rows:
        cells = [_speed(row["images_per_s"].get(d)) for d in datasets]
        lines.append(f"| {row['backbone']} | {row['features']} | " + " | ".join(cells) + f" | {row['device']} |")
    return "\n".join(lines) + "\n"


def write_tables(output: str, store: Storage) -> dict:
    """Rebuild ``table.md`` and ``table.json`` under `output` from every result there."""
    tables = build_tables(collect_results(output, store))
    store.write_text(storage.join(output, "table.md"), tables["markdown"])
    store.write_text(storage.join(output, "table.json"), json.dumps(tables["json"], indent=2))
    return tables
