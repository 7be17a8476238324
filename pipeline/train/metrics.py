"""Rank-0 metrics of a run: CSV and TensorBoard events in a local dir, mirrored to the run dir,
and the loss curve drawn from the CSV at the end."""
from __future__ import annotations

import os
import tempfile

from pipeline import storage
from pipeline.storage import Storage


class Metrics:
    """Rank-0 metrics: CSV + TensorBoard in a local dir, mirrored to the run dir."""

    COLUMNS = ("kind", "step", "epoch", "loss", "samples_per_s", "tokens_per_s", "data_wait_share", "lr", "samples",
               "val_mse", "baseline_mse", "val_ratio", "storage_retries", "cache")  # cache: a mixture's per-cache rows

    def __init__(self, run_dir: str, store: Storage, enabled: bool):
        self.run_dir, self.store, self.enabled = run_dir, store, enabled
        self.local = tempfile.mkdtemp(prefix="spar-metrics-")
        self.csv = os.path.join(self.local, "metrics.csv")
        self.writer = None
        if enabled:
            remote = storage.join(run_dir, "metrics.csv")
            if store.exists(remote):  # a resumed run appends
                store.download(remote, self.csv)
                self._upgrade()
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(self.local, "tensorboard"))

    def _upgrade(self) -> None:
        """A CSV written by an earlier version (fewer columns) rewritten with today's, its cells kept."""
        import csv

        with open(self.csv) as f:
            rows = list(csv.DictReader(f))
            f.seek(0)
            if f.readline().rstrip("\n") == ",".join(self.COLUMNS):
                return
        with open(self.csv, "w") as f:
            f.write(",".join(self.COLUMNS) + "\n")
            f.writelines(",".join(r.get(c) or "" for c in self.COLUMNS) + "\n" for r in rows)

    def log(self, row: dict) -> None:
        """One CSV row with the fixed COLUMNS (blank where a row kind has no value)."""
        if not self.enabled:
            return
        new = not os.path.exists(self.csv)
        with open(self.csv, "a") as f:
            if new:
                f.write(",".join(self.COLUMNS) + "\n")
            cells = (row.get(c, "") for c in self.COLUMNS)
            f.write(",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in cells) + "\n")
        per_cache = f"/cache{row['cache']}" if "cache" in row else ""
        for k, v in row.items():
            if k not in ("step", "epoch", "kind", "cache"):
                self.writer.add_scalar(f"{row['kind']}/{k}{per_cache}", v, row["step"])

    def sync(self) -> None:
        """Copy CSV and event files to the run dir."""
        if not self.enabled:
            return
        self.writer.flush()
        for root, _, files in os.walk(self.local):
            for name in files:
                path = os.path.join(root, name)
                self.store.upload(path, storage.join(self.run_dir, os.path.relpath(path, self.local)))

    def plot(self, loss_name: str = "mse") -> None:
        """loss_curve.png from the CSV: the training loss per logged step (or per epoch when no step
        was logged), the held-out MSE per validation (a mixture's: also per cache, dotted), and the
        untrained single pass as a line."""
        if not self.enabled or not os.path.exists(self.csv):
            return
        import csv

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with open(self.csv) as f:
            rows = list(csv.DictReader(f))
        steps = [r for r in rows if r["kind"] == "step"]
        epochs = [r for r in rows if r["kind"] == "epoch" and not r.get("cache")]
        vals = [r for r in rows if r["kind"] == "val" and not r.get("cache")]
        per_cache: dict[str, list] = {}
        for r in rows:
            if r["kind"] == "val" and r.get("cache"):
                per_cache.setdefault(r["cache"], []).append(r)
        if not (steps or epochs or vals):
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        values = []
        if steps:
            values += [float(r["loss"]) for r in steps]
            ax.plot([int(r["step"]) for r in steps], values, lw=1, marker="o" if len(steps) < 40 else None, ms=3,
                    label=f"training {loss_name}, per logged step")
        if epochs:
            means = [float(r["loss"]) for r in epochs]
            values += means
            ax.plot([int(r["step"]) for r in epochs], means, lw=1, ls=":", marker="D", ms=4,
                    label=f"training {loss_name}, epoch mean")
        if vals:
            values += [float(r["val_mse"]) for r in vals]
            ax.plot([int(r["step"]) for r in vals], [float(r["val_mse"]) for r in vals], lw=1.5, marker="s", ms=4,
                    label="held-out MSE, student")
            for cache, own in per_cache.items():
                ax.plot([int(r["step"]) for r in own], [float(r["val_mse"]) for r in own], lw=1, ls=":", marker=".",
                        label=f"held-out MSE, cache[{cache}]")
            ax.axhline(float(vals[0]["baseline_mse"]), color="grey", ls="--", lw=1,
                       label="held-out MSE, untrained single pass")
            last = vals[-1]
            ax.set_title(f"student vs teacher: held-out MSE {float(last['val_ratio']):.3f} x the single pass")
        else:
            ax.set_title("student vs teacher")
        positive = [v for v in values if v > 0]
        wide = positive and max(positive) / min(positive) > 20  # log scale only when the range needs it
        ax.set(xlabel="step", ylabel="loss against the teacher's features", yscale="log" if wide else "linear")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = os.path.join(self.local, "loss_curve.png")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        self.store.upload(path, storage.join(self.run_dir, "loss_curve.png"))


class KeyLog:
    """With ``record_keys``: which samples each rank trained on, step by step, as CSV files under
    ``<run>/keys/`` (epoch, step, rank, key, the batch's loss, the key's cache: its index in the run's
    ``cache=`` list). Each rank writes the rows since its
    last write just before each checkpoint, so the files cover every committed step; an audit of
    "every sample of an epoch exactly once" reads them all. Rows of steps after the last committed
    checkpoint of a crashed attempt can appear twice (those steps are trained again)."""

    HEADER = "epoch,step,rank,key,loss,cache\n"  # cache: the key's cache, an index into the run's cache= list

    def __init__(self, run_dir: str, store: Storage, rank: int, enabled: bool):
        self.run_dir, self.store, self.rank, self.enabled = run_dir, store, rank, enabled
        self.rows: list[str] = []
        self.first = None

    def add(self, epoch: int, step: int, keys: list[str], loss: float, caches: list[int] | None = None) -> None:
        """The keys of one real batch, trained at (0-based) `step`, and the cache of each."""
        if not self.enabled:
            return
        self.first = step if self.first is None else self.first
        caches = caches or [0] * len(keys)
        self.rows.extend(f"{epoch},{step},{self.rank},{k},{loss:.9g},{c}\n" for k, c in zip(keys, caches))
        self.last = step

    def flush(self) -> None:
        if not self.rows:
            return
        name = f"rank-{self.rank:04d}-steps-{self.first:09d}-{self.last:09d}.csv"
        self.store.write_text(storage.join(self.run_dir, "keys", name), self.HEADER + "".join(self.rows))
        self.rows, self.first = [], None
