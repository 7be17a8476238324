"""The teacher-cache job: Ray Data streams sources -> augment -> teacher actors -> shard writers.

    read + decode + augment + PNG   CPU tasks            (pipeline.cache.tasks, pipeline.cache.augment.augment_row)
    sliding-window teacher          actor pool, 1 GPU each (pipeline.cache.teacher.TeacherActor)
    shard tars                      CPU tasks            (pipeline.cache.tasks.write_batch)
    manifest commits                the driver           (group commits: pipeline.cache.shards.commit)

The driver commits the shards the writers wrote, several at a time (`shards_per_commit`, or what
`commit_every_s` gathered): one writer of the manifest's log instead of one per writer task, and a
few thousand commits for SA-1B instead of one per shard (each later commit replays more of the log,
and concurrent ones retry; `benchmark.py commits`). A commit holds whole shards, atomically.

Re-running the same command resumes: committed (key, view) pairs are not recomputed.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa

import spar
from pipeline import __version__, retry, storage
from pipeline.cache import shards, sources
from pipeline.cache.augment import AugmentConfig, augment_row
from pipeline.cache.encode import DEFAULT_IMAGE_ENCODING, ENCODINGS, IMAGE_ENCODINGS, IMAGE_MEMBERS
from pipeline.cache.reader import FORMAT, FingerprintMismatch, check_format, fingerprint_diff, fingerprint_digest
from pipeline.cache.tasks import expand_tar, image_row, write_batch
from pipeline.cache.teacher import TeacherActor
from pipeline.config import check, redacted_repr, resolve_paths, resolve_weights, to_dict, to_yaml
from pipeline.devices import REQUESTABLE, resolve_compute_dtype
from pipeline.logs import Progress
from pipeline.storage import Storage, public_url

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TeacherConfig:
    """Teacher actors: placement and batching."""

    num_gpus: float = -1.0  # GPUs per actor; -1 = 1 unless device=cpu or the cluster has and can get no GPU
    num_cpus: float = -1.0  # CPUs per actor; -1 = 1 with GPUs, else 0.5 (whole CPUs deadlock small hosts)
    min_actors: int = 0  # pool size range; 0 = GPUs there now (at least 1) / one per CPU node
    max_actors: int = 0  # 0 = every GPU the cluster has or its autoscaler can add / as min_actors on CPU
    num_actors: int = 0  # a fixed pool size (overrides min_actors and max_actors)
    threads: Optional[int] = None  # torch threads of a CPU actor (default: all cores)
    batch_images: int = 2  # images per actor call; their windows share ViT batches
    window_batch: int = 0  # windows per ViT forward (bounds memory); 0 = 64 on CPU, 256 on GPU (less if short of memory)
    # auto (bf16 on GPU, float32 on CPU) | float32 (TF32 on GPU) | bfloat16 | float16 (the reference's); fingerprinted
    amp_dtype: str = "auto"
    strict_fp32: bool = False  # with float32 on a GPU: IEEE float32 matmuls instead of TF32
    compile: bool = False  # torch.compile the window forward (one static shape; the first call compiles)
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self):
        check(self.amp_dtype in REQUESTABLE, f"teacher.amp_dtype must be one of {list(REQUESTABLE)}")
        check(self.batch_images >= 1 and self.window_batch >= 0, "teacher.batch_images must be >= 1, window_batch >= 0")


@dataclass(kw_only=True)
class CacheConfig:
    """`jobs/cache_teacher.py`: cache sliding-window teacher targets as WebDataset shards."""

    source: str = sources.BUILTIN  # folder / fsspec prefix / .txt or .parquet list / tars / builtin:samples
    output: str = "out/cache"  # local dir or fsspec URL of the cache
    backbone: str = "maskclip"  # spar registry name
    pretrained: Optional[str] = "default"  # open_clip tag ("default" = the backbone's), file/URL, or null
    init_seed: int = 0  # seed of a random init (pretrained=null)
    crop: Optional[int] = None  # teacher window; default the backbone's pre-training size
    stride: int = 24  # teacher stride in pixels
    seed: int = 0  # augmentation seed: views are a function of (seed, key, view)
    views: int = 1  # augmented views per source image
    encoding: str = "float16"  # target encoding: float16 | float32 | int8 (per-token scales)
    image_encoding: str = DEFAULT_IMAGE_ENCODING  # raw (uint8 .npy: no decode) | png (lossless, smaller, slow to decode)
    shard_size: int = 32  # max samples per shard tar
    limit: Optional[int] = None  # only the first N source images (natural order; tars: natural order, then tar order)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    max_pixels: int = 100_000_000  # decompression-bomb cap on source pixels
    min_source_side: int = 32  # sources with a shorter side are recorded as too small
    max_aspect: float = 10.0  # sources more elongated than this are recorded (memory bound)
    max_failed_fraction: float = 0.05  # exit non-zero if more of this run's inputs fail
    orphan_retention_s: float = 3600.0  # tars no commit names are deleted once older, and older than every live job's start
    manifest_checkpoint_every: int = 1000  # shards between the driver's compactions + checkpoints of the manifest
    shards_per_commit: int = 64  # the driver commits written shards once this many wait ...
    commit_every_s: float = 10.0  # ... or the oldest has waited this long (a crash recomputes what waits)
    progress_every_s: float = 30.0  # the driver logs samples done / total, windows/s, bytes and an ETA; 0 = only at the end
    png_compress_level: int = 1  # 0-9: PNG is lossless at every level; 1 is fast
    read_cpus: float = -1.0  # CPUs per read/augment task; -1 = 1 with GPUs, else 0.5 (fits beside CPU actors)
    write_cpus: float = 0.5  # CPUs per shard-writer task
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options (endpoint, keys) for every read/write
    ray_address: Optional[str] = None  # "auto": this node's cluster; default RAY_ADDRESS, else a new local one
    num_cpus: Optional[int] = None  # CPUs of a local cluster this job starts

    __repr__ = redacted_repr  # without storage_options' secrets, wherever a config is printed

    def __post_init__(self):
        spar.get_spec(self.backbone)
        check(self.encoding in ENCODINGS, f"encoding must be one of {ENCODINGS}")
        check(self.image_encoding in IMAGE_ENCODINGS, f"image_encoding must be one of {IMAGE_ENCODINGS}")
        check(self.views >= 1, "views must be >= 1")
        check(self.shard_size >= 1, "shard_size must be >= 1")
        check(self.stride >= 1, "stride must be >= 1")
        check(0 <= self.max_failed_fraction <= 1, "max_failed_fraction must be in [0, 1]")
        check(self.orphan_retention_s >= 0 and self.manifest_checkpoint_every >= 1,
              "orphan_retention_s must be >= 0 and manifest_checkpoint_every >= 1")
        check(self.shards_per_commit >= 1 and self.commit_every_s >= 0,
              "shards_per_commit must be >= 1 and commit_every_s >= 0")
        check(self.limit is None or self.limit >= 1, "limit must be >= 1")
        spec = spar.get_spec(self.backbone)
        crop = self.crop or spec.window
        check(crop % spec.patch_size == 0, f"crop {crop} is not a multiple of {self.backbone}'s patch size "
                                           f"{spec.patch_size}")
        check(self.augment.multiple % spec.patch_size == 0,
              f"augment.multiple={self.augment.multiple} is not a multiple of {self.backbone}'s patch size "
              f"{spec.patch_size}: views would not cover whole patches; pass augment.multiple={spec.patch_size}")
        check(self.stride <= crop, f"stride {self.stride} > crop {crop}: windows would leave parts of images "
                                   "uncovered")
        check(self.augment.min_side >= crop, f"augment.min_side {self.augment.min_side} < teacher crop {crop}")
        if self.pretrained == "default":
            self.pretrained = spec.default_pretrained
        self.pretrained = resolve_weights(self.pretrained)
        resolve_paths(self, "source", "output")  # builtin:samples and URLs stay as they are


class TooManyFailures(RuntimeError):
    """More inputs failed than `max_failed_fraction` allows (the cache keeps what succeeded)."""


def build_fingerprint(cfg: CacheConfig, store: Storage, compute_dtype: str | None = None,
                      recorded: dict | None = None) -> dict:
    """The teacher's identity: everything that changes what a target contains. `compute_dtype` is
    the resolved precision (`teacher_precision`); default: what a CPU teacher would use. `recorded`:
    the fingerprint of the cache this run extends, whose weights file (at the same location) must be
    the one it recorded (`FingerprintMismatch` otherwise, naming both digests)."""
    from spar.weights import WeightsMismatch, weights_identity

    spec = spar.get_spec(cfg.backbone)
    expected = _recorded_weights(recorded, cfg.pretrained)
    try:
        weights = store.call("weights", cfg.pretrained or "", lambda: weights_identity(
            spec.model_name, cfg.pretrained, store.weights_options(cfg.pretrained or ""), expected))
    except WeightsMismatch as e:
        raise FingerprintMismatch(f"{cfg.output} holds a cache made with other weights at the same location; "
                                  f"refusing to mix two teachers: {e}. Restore the original file, or make a new "
                                  "cache (another output) with this one.") from None
    if weights["kind"] == "file":
        weights["uri"] = public_url(cfg.pretrained)
    if weights["kind"] == "random":
        weights["init_seed"] = cfg.init_seed
    crop = cfg.crop or spec.window
    fp = {
        "format": FORMAT, "backbone": spec.name, "model_name": spec.model_name, "weights": weights,
        "patch_size": spec.patch_size, "dim": spec.dim, "crop": crop, "stride": cfg.stride,
        "upsample_factor": spar.upsample_factor(spec.patch_size, cfg.stride),
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
        "compute_dtype": compute_dtype or teacher_precision(cfg, gpu=False), "encoding": cfg.encoding,
        "image_format": cfg.image_encoding,
        "augmentation": {"seed": cfg.seed, **to_dict(cfg.augment)},
        "project_version": __version__,
    }
    fp["fingerprint"] = fingerprint_digest(fp)
    return fp


def _recorded_weights(recorded: dict | None, pretrained: str | None) -> str | None:
    """The sha256 a cache recorded for the weights file(s) at `pretrained`, if it recorded that location."""
    weights = (recorded or {}).get("weights") or {}
    if weights.get("kind") == "file" and weights.get("uri") == public_url(pretrained):
        return weights["value"]
    return None


def teacher_precision(cfg: CacheConfig, *, gpu: bool, gpu_types: tuple[str, ...] = ()) -> str:
    """The compute dtype of this job's teacher actors (`pipeline.devices.resolve_compute_dtype`)."""
    return resolve_compute_dtype(cfg.teacher.amp_dtype, gpu=gpu, strict_fp32=cfg.teacher.strict_fp32,
                                 gpu_types=gpu_types)


def claim_output(cfg: CacheConfig, store: Storage, compute_dtype: str | None = None) -> dict:
    """Write the fingerprint into a new output, or check it against an existing one.

    An output whose earlier run committed nothing (it failed before its first shard, e.g. weights that
    could not be fetched) is not a cache yet: its fingerprint is replaced, with a warning.
    """
    path = storage.join(cfg.output, "teacher.json")
    old = shards.read_json(store, path) if store.exists(path) else None
    committed = False
    if old is not None:
        check_format(cfg.output, old)
        manifest = shards.open_table(store, cfg.output)
        committed = manifest is not None and bool(manifest.file_uris())
    # a cache with shards pins its weights file: this run must load the same bytes, even from the same URL
    fp = build_fingerprint(cfg, store, compute_dtype, recorded=old if committed else None)
    if old is not None:
        if old.get("fingerprint") == fp["fingerprint"]:
            return old
        diff = "\n  ".join(fingerprint_diff(old, fp)) or "(fingerprint digest differs)"
        if committed:
            raise FingerprintMismatch(
                f"{cfg.output} holds a cache made with different teacher settings; refusing to mix them:\n  "
                f"{diff}\nUse another output, or the original settings to resume or extend it.")
        log.warning("%s holds no committed shard yet; replacing its fingerprint:\n  %s", cfg.output, diff)
    shards.write_json(store, path, fp)
    return fp


@dataclass
class WorkItems:
    """What a run computes: tar items (dicts, one per tar), or images as (name, view) rows of
    `root` + name."""

    tars: list[dict] | None = None
    root: str = ""
    images: pa.Table | None = None

    def __len__(self) -> int:
        return len(self.tars) if self.tars is not None else self.images.num_rows


def work_items(cfg: CacheConfig, store: Storage, done: shards.Committed) -> tuple[WorkItems, int]:
    """(what to compute, source images listed: -1 for tars without a limit).

    Tar sources are expanded on the workers, one item per tar; a tar's item carries the digests of
    its own committed keys (`shards.Committed.in_tar`), not the whole set. With ``limit=N`` the
    driver first decides which members are the first N (tars in natural order, members in tar
    order) by `sources.plan_tar_limit`, so a rerun or an extension with a larger N picks the same
    images first. Other sources become a table of (image name below the listed root, view) that
    are not committed yet, keyed `sources.LIST_CHUNK` images at a time: ~25 bytes an image to do.
    """
    kind = sources.source_kind(cfg.source, store)
    if kind == "tars":
        tars = sources.list_tars(cfg.source, store)
        if cfg.limit is None:
            return WorkItems(tars=[{"tar": t, "done": done.in_tar(t).digests.tobytes()} for t in tars]), -1
        plan = sources.plan_tar_limit(tars, store, cfg.limit, cfg.output)
        return (WorkItems(tars=[{"tar": t, "members": names, "done": done.in_tar(t).digests.tobytes()}
                                for t, names in plan]), sum(len(n) for _, n in plan))
    listed = sources.list_images(cfg.source, store, kind, check=False).head(cfg.limit)
    rows, views, hashes = [], [], []
    for lo in range(0, len(listed), sources.LIST_CHUNK):
        keys = [sources.make_key(u) for u in listed.uris(lo, lo + sources.LIST_CHUNK)]
        hashes.append(shards.key_hashes(pa.array(keys, pa.string())))
        for v in range(cfg.views):
            todo = np.flatnonzero(~done.keys.contains([f"{k}_v{v}" for k in keys])).astype(np.int32)
            rows.append(todo + lo)
            views.append(np.full(len(todo), v, np.int8 if cfg.views < 128 else np.int32))
    sources.check_unique(listed, np.concatenate(hashes) if hashes else np.zeros(0, np.uint64))
    del hashes
    rows, views = (np.concatenate(rows), np.concatenate(views)) if rows else (np.zeros(0, np.int32), np.zeros(0, np.int8))
    if cfg.views == 1 and len(rows) == len(listed):  # nothing committed yet: every name, as listed
        return WorkItems(root=listed.root, images=pa.table({"name": listed.names, "view": views})), len(listed)
    by_image = np.lexsort((views, rows))  # image by image, views in order
    images = pa.table({"name": listed.names.take(pa.array(rows[by_image])), "view": views[by_image]})
    return WorkItems(root=listed.root, images=images), len(listed)


class GroupCommit:
    """The driver's commits of written shards: one append per `shards_per_commit` shards or per
    `commit_every_s` seconds since the oldest waiting one arrived (checked every second, also while no
    shard arrives, so a crash loses at most that much work; the job's `shards.WriterLease` keeps
    clean-ups off the tars that wait), and of whatever waits when the run ends or fails (`close`)."""

    def __init__(self, cfg: CacheConfig, store: Storage):
        self.cfg, self.store, self.waiting, self.since, self.commits = cfg, store, [], 0.0, 0
        self.lock, self.stopped, self.error = threading.Lock(), threading.Event(), None
        self.timer = threading.Thread(target=self._commit_when_due, name="group-commit", daemon=True)
        self.timer.start()

    def add(self, rows: bytes) -> None:
        with self.lock:
            self._raise_timer_error()
            if rows:
                if not self.waiting:
                    self.since = time.monotonic()
                self.waiting.append(pa.ipc.open_stream(rows).read_all())
            if len(self.waiting) >= self.cfg.shards_per_commit or self._due():
                self._commit()

    def flush(self) -> None:
        with self.lock:
            self._raise_timer_error()
            self._commit()

    def close(self) -> None:
        """Commit what waits; if that fails, the run's error stands and the tars are orphans."""
        self.stopped.set()
        self.timer.join()
        try:
            self.flush()
        except Exception as e:  # noqa: BLE001  (already failing: the first error is the one to raise)
            log.error("could not commit %d written shards (they are recomputed by a rerun): %s", len(self.waiting), e)

    def _due(self) -> bool:
        return bool(self.waiting) and time.monotonic() - self.since >= self.cfg.commit_every_s

    def _commit(self) -> None:
        if self.waiting:
            shards.commit(self.store, self.cfg.output, self.waiting)
            self.waiting, self.commits = [], self.commits + 1

    def _commit_when_due(self) -> None:
        while not self.stopped.wait(min(1.0, max(self.cfg.commit_every_s / 4, 0.05))):
            with self.lock:
                if self.error is None and self._due():
                    try:
                        self._commit()
                    except Exception as e:  # noqa: BLE001  (raised in the driver's thread, at its next call)
                        self.error = e

    def _raise_timer_error(self) -> None:
        if self.error is not None:
            raise self.error


def teacher_pool(cfg: CacheConfig):
    """The teacher actor pool this cluster gives the job (`pipeline.ray_utils.actor_pool`)."""
    from pipeline.ray_utils import actor_pool

    t = cfg.teacher
    return actor_pool(device=t.device, num_gpus=t.num_gpus, num_cpus=t.num_cpus, num_actors=t.num_actors,
                      min_actors=t.min_actors, max_actors=t.max_actors)


def build_dataset(cfg: CacheConfig, store: Storage, items: WorkItems, fp: dict, run: str, pool):
    """The streaming Ray Data pipeline for `items` (not executed yet) on the actor `pool`."""
    import ray

    t = cfg.teacher
    log.info("teacher: %s, %d images per call, %s", pool.describe(), t.batch_images, fp["compute_dtype"])
    # What the storage layer's retries could not save (a store down past the deadline) fails a task:
    # Ray Data runs it again, twice. Safe for every task here: a shard's tar is named by its bytes and
    # is committed by the driver from the one attempt that returned; reads only read.
    context = ray.data.DataContext.get_current()
    context.retried_map_errors = [retry.GAVE_UP]
    context.max_map_retries = max(context.max_map_retries, 2)
    read_cpus = cfg.read_cpus if cfg.read_cpus > 0 else (1.0 if pool.num_gpus else 0.5)
    if items.tars is not None:
        ds = ray.data.from_items(items.tars, override_num_blocks=max(1, min(len(items), 1000)))
        ds = ds.flat_map(expand_tar, fn_kwargs={"views": cfg.views, "store": store, "output": cfg.output},
                         num_cpus=read_cpus)
    else:
        step = -(-len(items) // 1000)  # at most 1,000 blocks
        ds = ray.data.from_arrow([items.images.slice(lo, step) for lo in range(0, len(items), step)])
        ds = ds.map(image_row, fn_kwargs={"root": items.root}, num_cpus=read_cpus)
    ds = ds.map(augment_row, num_cpus=read_cpus, fn_kwargs={
        "seed": cfg.seed, "cfg": cfg.augment, "max_pixels": cfg.max_pixels, "min_source_side": cfg.min_source_side,
        "max_aspect": cfg.max_aspect, "image_encoding": cfg.image_encoding, "png_level": cfg.png_compress_level,
        "store": store})
    ds = ds.map_batches(
        TeacherActor, batch_size=t.batch_images, batch_format="numpy", compute=pool.strategy(),
        num_gpus=pool.num_gpus, num_cpus=pool.num_cpus, scheduling_strategy="SPREAD", fn_constructor_kwargs={
            "backbone": cfg.backbone, "pretrained": cfg.pretrained, "crop": cfg.crop, "stride": cfg.stride,
            "window_batch": t.window_batch, "compute_dtype": fp["compute_dtype"], "compile": t.compile,
            "encoding": cfg.encoding, "image_ext": IMAGE_MEMBERS[cfg.image_encoding], "device": t.device,
            "threads": t.threads, "fingerprint": fp["fingerprint"], "weights": fp["weights"],
            "init_seed": cfg.init_seed, "store": store})
    return ds.map_batches(write_batch, batch_size=cfg.shard_size, batch_format="numpy", num_cpus=cfg.write_cpus,
                          fn_kwargs={"output": cfg.output, "image_ext": IMAGE_MEMBERS[cfg.image_encoding],
                                     "store": store, "run": run})


def run(cfg: CacheConfig) -> dict:
    """Run (or resume) the cache job; returns the summary. Raises `TooManyFailures` after writing
    everything that succeeded if too many inputs failed."""
    from pipeline.ray_utils import accelerator_types, init_ray, require_on_every_node

    store = Storage(cfg.storage_options)
    started = init_ray(cfg.ray_address, cfg.num_cpus)
    t0 = time.perf_counter()
    totals = {"samples": 0, "errors": 0, "transient": 0, "bytes": 0, "windows": 0, "shards": 0, "commits": 0}
    retries = retry.merge({}, retry.take_counts())  # this run's storage retries, every process's
    try:
        # the precision is part of the fingerprint and follows the actors' devices: decided before the claim
        pool = teacher_pool(cfg)
        fp = claim_output(cfg, store, teacher_precision(cfg, gpu=pool.num_gpus > 0, gpu_types=accelerator_types()))
        shards.create_tables(store, cfg.output)
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        # the lease keeps every clean-up (this job's, another job's) off the tars this run has not committed yet
        with shards.WriterLease(store, cfg.output, run_id):
            shards.clean_orphans(store, cfg.output, cfg.orphan_retention_s)
            store.write_text(storage.join(cfg.output, "config.yaml"), to_yaml(cfg))
            store.write_text(storage.join(cfg.output, "runs", run_id, "config.yaml"), to_yaml(cfg))
            done = shards.committed_keys(store, cfg.output)  # 16 bytes a key
            items, listed = work_items(cfg, store, done)
            log.info("fingerprint %s; %d samples already committed (manifest version %d); %d work items",
                     fp["fingerprint"][:19], len(done), done.version, len(items))
            require_on_every_node(storage.join(cfg.output, "teacher.json"), "the cache output")
            if items:
                dataset = build_dataset(cfg, store, items, fp, run_id, pool)
                expected = (len(items) if items.tars is None
                            else -1 if listed < 0 else listed * cfg.views - len(done))
                progress = Progress(log, "cache progress, samples", expected, cfg.progress_every_s)
                commits = GroupCommit(cfg, store)
                try:
                    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                        for k in ("samples", "errors", "transient", "bytes", "windows"):
                            totals[k] += int(np.sum(batch[k]))
                        for taken in batch["retries"]:
                            retry.merge(retries, json.loads(taken))
                        for rows in batch["rows"]:
                            commits.add(rows)
                        progress.update(totals["samples"] + totals["errors"], _rates(totals, progress))
                        before = totals["shards"]
                        totals["shards"] += int(np.sum(batch["samples"] > 0))
                        if before // cfg.manifest_checkpoint_every != totals["shards"] // cfg.manifest_checkpoint_every:
                            commits.flush()
                            shards.finish(store, cfg.output)  # keeps opening the manifest cheap during long jobs
                    commits.flush()
                finally:
                    commits.close()
                totals["commits"] = commits.commits
                progress.update(totals["samples"] + totals["errors"], _rates(totals, progress), force=True)
        shards.finish(store, cfg.output)
    finally:
        if started:
            import ray

            ray.shutdown()
    return _summarize(cfg, store, run_id, totals, retry.merge(retries, retry.take_counts()), len(done), listed,
                      time.perf_counter() - t0)


def _rates(totals: dict, progress: Progress) -> str:
    import time

    seconds = max(time.monotonic() - progress.t0, 1e-9)
    return (f"{totals['windows'] / seconds:.3g} windows/s, {totals['bytes'] / 1e9:.3g} GB written, "
            f"{totals['errors']} failed ({totals['transient']} for storage faults)")


def _summarize(cfg: CacheConfig, store: Storage, run_id: str, totals: dict, retries: dict, before: int,
               listed: int, seconds: float) -> dict:
    samples_now, version, duplicates = shards.read_samples(store, cfg.output)
    attempted = totals["samples"] + totals["errors"]
    summary = {
        "run": run_id, "output": public_url(cfg.output), "source_images": listed,
        "already_committed": before, "computed": totals["samples"], "failed": totals["errors"],
        "failed_transient": totals["transient"],
        "failed_fraction": totals["errors"] / attempted if attempted else 0.0,
        "committed_total": samples_now.num_rows, "manifest_version": version,
        "keys_committed_twice": len(set(duplicates.column("key").to_pylist())), "shards_written": totals["shards"],
        "manifest_commits": totals["commits"],
        "bytes_written": totals["bytes"], "seconds": seconds,
        "images_per_s": totals["samples"] / seconds if seconds else 0.0,
        "windows_per_s": totals["windows"] / seconds if seconds else 0.0,
        "storage_retries": sum(retries.values()), "storage_retries_by_kind": retries,
    }
    shards.write_json(store, storage.join(cfg.output, "runs", run_id, "summary.json"), summary)
    log.info("summary: %s", json.dumps(summary))
    if summary["failed_fraction"] > cfg.max_failed_fraction:
        raise TooManyFailures(f"{totals['errors']} of {attempted} inputs failed "
                              f"({summary['failed_fraction']:.1%} > max_failed_fraction "
                              f"{cfg.max_failed_fraction:.1%}); see {storage.join(cfg.output, 'errors')}")
    return summary
