"""The student-training job: a Ray Train `TorchTrainer` whose workers run DeepSpeed on cache shards.

Only `scaling.*` changes between a laptop and a cluster. ``cache=`` is one cache or a list of them
(a mixture: one teacher, drawn in the proportions of ``mix=``; see `pipeline.train.epochs`). Everything workers need travels in
``train_loop_config``; the run's directory is ``<output>/<name>`` (local or ``s3://…``), where Ray
Train keeps its checkpoints and this job writes ``student.safetensors``, ``student.json``,
``metrics.csv``, TensorBoard events and ``loss_curve.png``. Re-running the same command resumes
from the latest committed checkpoint.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import spar
from pipeline import storage
from pipeline.train.epochs import check_weights, draw_counts
from pipeline.cache.reader import CacheError, FingerprintMismatch, open_cache, teacher_diff, teacher_weights
from pipeline.storage import public_url
from pipeline.config import ConfigError, check, redacted_repr, resolve_paths, resolve_weights, to_yaml
from pipeline.storage import Storage
from pipeline.train.checkpoint import check_latest_checkpoint
from pipeline.train.engine import PRECISIONS, deepspeed_config

log = logging.getLogger(__name__)

FROM_CACHE = "from-cache"  # backbone / pretrained default: whatever the cache's teacher used


@dataclass(kw_only=True)
class ScalingSettings:
    """Workers and their resources: the only keys that change from a laptop to a cluster."""

    num_workers: int = 1  # data-parallel ranks (one per GPU on GPU clusters)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # Ray CPUs reserved per rank (its loader processes run inside)
    gpus_per_worker: float = 1.0  # with use_gpu


@dataclass(kw_only=True)
class DataSettings:
    """How shards become batches."""

    loader_workers: int = 0  # background decoding processes per rank; 0 = scaling.cpus_per_worker (the rank's CPUs)
    prefetch: int = 4  # batches each loader process decodes ahead
    shuffle_buffer: int = 8  # per loader process; 1 = shard-order only
    verify_checksums: bool = True  # crc32 of every member while reading


@dataclass(kw_only=True)
class TrainConfig:
    """`jobs/train_student.py`: regress the single-pass student on a teacher cache."""

    # teacher cache URL (required), or a list of them: a mixture of caches of one teacher (image sizes may differ)
    cache: Any = ""
    # with several caches: the relative weight of each in an epoch's draws (a smaller cache is repeated, a
    # larger one subsampled, per epoch from the seed); null = every sample of every cache once
    mix: Optional[list[float]] = None
    epoch_samples: Optional[int] = None  # with mix: samples an epoch draws, all caches together; null = all they hold
    output: str = "out/train"  # storage_path: local dir or fsspec URL
    name: str = "spar-student"  # run name: the same name resumes the same run
    backbone: str = FROM_CACHE  # must match the cache fingerprint if given
    pretrained: Optional[str] = FROM_CACHE  # must match the cache fingerprint if given
    trainable: str = spar.DEFAULT_TRAINABLE  # blk_i, qkv_i, mlp_i, posembed, patchembed, all
    loss: str = "mse"  # mse | smooth_l1 | cosine
    lr: float = 2e-5
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    epochs: int = 10
    max_steps: Optional[int] = None  # stop after this many (micro-)steps in total (a multiple of grad_accum)
    batch_size: int = 1  # images per step per rank (one image size per batch)
    grad_accum: int = 1
    grad_clip: float = 0.0  # 0 = no clipping
    precision: str = "auto"  # bf16 | fp16 | fp32 | auto: per rank, bf16 on GPUs that have it, else fp16; fp32 on CPU
    zero_stage: int = 0  # DeepSpeed ZeRO 0-3; 0 suits the default 2 trainable blocks, 2-3 for trainable=all
    activation_checkpointing: bool = False
    # dinov3txt only: train-mode RoPE coordinate rescaling by a log-uniform factor in [1/R, R] per block
    # (official DINOv3 pre-training: 2); null = off, as the SPAR reference trains (docs/method.md §4)
    rope_rescale: Optional[float] = None
    deepspeed_config: Optional[str] = None  # JSON (e.g. infra/deepspeed/zero3.json) merged over the generated one
    seed: int = 0  # data order (pinned by the run: a resume with another seed is refused)
    checkpoint_every: int = 0  # steps between checkpoints (a multiple of grad_accum); 0 = at the end of every epoch
    keep_checkpoints: int = 3
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    log_every: int = 10
    val_fraction: float = 0.02  # held out of the cache by a stable hash of the source image (>= 1 image); 0 = none
    val_max_images: int = 1000  # at most this many held-out source images (those of lowest hash): a bounded set
    val_cache: Optional[str] = None  # validate on this cache instead (nothing is held out)
    val_every: int = 0  # steps between validations besides each epoch's end; 0 = epoch ends only
    record_keys: bool = False  # write the keys each rank trained on, per step, to <run>/keys/ (an audit)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    data: DataSettings = field(default_factory=DataSettings)
    storage_options: dict[str, Any] = field(default_factory=dict)
    ray_address: Optional[str] = None  # "auto": this node's cluster; default RAY_ADDRESS, else a new local one
    num_cpus: Optional[int] = None  # CPUs of a local cluster this job starts

    __repr__ = redacted_repr  # without storage_options' secrets, wherever a config is printed

    def __post_init__(self):
        many = isinstance(self.cache, (list, tuple))
        urls = list(self.cache) if many else [self.cache]
        check(bool(urls) and all(isinstance(u, str) and u for u in urls),
              "cache=<url of a teacher cache> (or a list of them: [url, url]) is required")
        if self.mix is not None:
            try:
                check_weights(self.mix, len(urls))
            except ValueError as e:
                raise ConfigError(str(e)) from None
        check(self.epoch_samples is None or (self.mix is not None and self.epoch_samples >= 1),
              "epoch_samples needs mix= (the weights that split it among the caches) and must be >= 1")
        check(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}")
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage must be 0, 1, 2 or 3")
        check(self.loss in ("mse", "smooth_l1", "cosine"), "loss must be mse, smooth_l1 or cosine")
        check(self.epochs >= 1 and self.batch_size >= 1 and self.grad_accum >= 1, "epochs, batch_size, grad_accum >= 1")
        check(self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1")
        # checkpoints fall between optimizer updates: a partly accumulated gradient is never lost
        check(self.checkpoint_every % self.grad_accum == 0 and (self.max_steps or 0) % self.grad_accum == 0,
              f"checkpoint_every and max_steps must be multiples of grad_accum={self.grad_accum}")
        check(self.scaling.num_workers >= 1, "scaling.num_workers must be >= 1")
        check(self.data.loader_workers >= 0, "data.loader_workers must be >= 0 (0 = scaling.cpus_per_worker)")
        if not self.data.loader_workers:  # resolved here, so config.yaml and checkpoints record the layout
            self.data.loader_workers = max(1, int(self.scaling.cpus_per_worker))
        check(0 <= self.val_fraction < 1 and self.val_every >= 0, "val_fraction must be in [0, 1), val_every >= 0")
        check(self.val_max_images >= 1, "val_max_images must be >= 1")
        if self.backbone != FROM_CACHE:
            spar.get_spec(self.backbone)  # a registry name or timm:<model>
        check(self.rope_rescale is None or self.rope_rescale >= 1, "rope_rescale must be >= 1 (or null)")
        resolve_paths(self, "output", "deepspeed_config", "val_cache")
        self.cache = [storage.resolve(u) for u in urls] if many else storage.resolve(urls[0])
        check(len(set(self.caches)) == len(self.caches), f"cache= names a cache twice: {self.caches}")
        if self.pretrained != FROM_CACHE:
            self.pretrained = resolve_weights(self.pretrained)

    @property
    def run_dir(self) -> str:
        return storage.join(self.output, self.name)

    @property
    def caches(self) -> list[str]:
        """The training caches' URLs (one, or a mixture's)."""
        return list(self.cache) if isinstance(self.cache, (list, tuple)) else [self.cache]

    def mixture(self) -> dict | None:
        """What a run on several caches (or with mix=) pins in its checkpoints; None for one cache."""
        if len(self.caches) == 1 and self.mix is None:
            return None
        return {"caches": [public_url(u) for u in self.caches], "mix": None if self.mix is None else list(self.mix),
                "epoch_samples": self.epoch_samples}


def student_source(cfg: TrainConfig, fingerprint: dict, store: Storage) -> dict:
    """Backbone and weights of the student (= the cache's teacher); refuses explicit mismatches, and
    a weights file that is not the one the cache recorded (replaced at its URL since): every worker
    checks that again before it loads it."""
    from spar.weights import WeightsMismatch, verified_weights, weights_identity

    backbone = fingerprint["backbone"]
    if cfg.backbone not in (FROM_CACHE, backbone):
        raise FingerprintMismatch(f"backbone={cfg.backbone!r}, but the cache {cfg.caches[0]} was made by {backbone!r}; "
                                  "the student must start from the teacher")
    weights = fingerprint["weights"]
    location, init_seed = teacher_weights(fingerprint)
    if cfg.pretrained != FROM_CACHE:
        location = cfg.pretrained
    options = store.weights_options(location or "")
    try:
        if cfg.pretrained == FROM_CACHE:
            store.call("weights", location or "", lambda: verified_weights(location, weights, options))
        else:
            recorded = weights["value"] if weights["kind"] == "file" else None
            given = store.call("weights", location or "", lambda: weights_identity(
                fingerprint["model_name"], location, options, expected=recorded))
            if (given["kind"], given["value"]) != (weights["kind"], weights["value"]):
                raise FingerprintMismatch(f"pretrained={public_url(cfg.pretrained)!r} is {given['kind']} "
                                          f"{given['value']}, but the cache's teacher used {weights['kind']} "
                                          f"{weights['value']}")
    except WeightsMismatch as e:
        raise FingerprintMismatch(f"the student must start from the teacher of the cache {cfg.caches[0]}, but its "
                                  f"weights file is not the one the cache recorded: {e}") from None
    return {"backbone": backbone, "pretrained": location, "init_seed": init_seed, "weights": weights}


def run(cfg: TrainConfig) -> dict:
    """Validate the cache, then train with Ray Train; returns the final metrics."""
    from pipeline.ray_utils import init_ray, require_on_every_node

    store = Storage(cfg.storage_options)
    caches = [_open(url, store) for url in cfg.caches]
    check_one_teacher(caches)
    cache = caches[0]
    source = student_source(cfg, cache.fingerprint, store)
    if cfg.rope_rescale is not None and spar.get_spec(source["backbone"]).family != "dinov3txt":
        raise ConfigError(f"rope_rescale={cfg.rope_rescale}: the cache's backbone {source['backbone']} has no "
                          "DINOv3 RoPE (the key applies to dinov3txt only)")
    validation, training = validation_split(cfg, store, caches)
    try:
        drawn = sum(draw_counts(training, cfg.mix, cfg.epoch_samples))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if drawn < cfg.scaling.num_workers:
        raise CacheError(f"{' + '.join(cfg.caches)} has {drawn} samples to train on per epoch, fewer than the "
                         f"{cfg.scaling.num_workers} workers")
    ds_json = _read_deepspeed_json(cfg.deepspeed_config, store)
    # Refuse a contradicting JSON before any worker starts. Each worker builds the config that runs,
    # with precision=auto resolved from its own device (this driver may have no GPU).
    deepspeed_config(cfg, cfg.scaling.num_workers, ds_json)
    # refuse a tampered checkpoint, or a resume with another seed, before any worker starts
    check_latest_checkpoint(store, cfg.run_dir, seed=cfg.seed, mixture=cfg.mixture())
    store.write_text(storage.join(cfg.run_dir, "config.yaml"), to_yaml(cfg))
    started = init_ray(cfg.ray_address, cfg.num_cpus)
    try:
        for url in cfg.caches:
            require_on_every_node(storage.join(url, "teacher.json"), "the cache")
        require_on_every_node(storage.join(cfg.run_dir, "config.yaml"), "the output")
        versions = [c.version for c in caches]
        result = _fit(cfg, store, source, cache.fingerprint, ds_json,
                      versions if len(versions) > 1 else versions[0], validation)
    finally:
        if started:
            import ray

            ray.shutdown()
    if result.error:
        raise result.error
    metrics = dict(result.metrics or {})
    log.info("training finished: %s", {k: metrics[k] for k in sorted(metrics) if not k.startswith("_")})
    return metrics


def _open(url: str, store: Storage):
    try:
        return open_cache(url, store)
    except CacheError:
        raise
    except FileNotFoundError as e:
        raise CacheError(f"cannot read the cache {url}: {e}") from None


def check_one_teacher(caches: list) -> None:
    """Refuse a mixture whose caches hold different teachers' targets (`teacher_diff`: backbone,
    weights, window, stride, normalization, compute dtype, encoding), naming each differing cache and
    field. How the images were drawn and stored (augmentation, image format) may differ."""
    first, problems = caches[0], []
    for i, other in enumerate(caches[1:], 1):
        diff = teacher_diff(first.fingerprint, other.fingerprint)
        if diff:
            problems.append(f"cache[{i}] {public_url(other.url)}:\n    " + "\n    ".join(diff))
    if problems:
        raise FingerprintMismatch(f"the caches of a run must hold one teacher's targets; these differ from cache[0] "
                                  f"{public_url(first.url)}:\n  " + "\n  ".join(problems))


def validation_split(cfg: TrainConfig, store: Storage, caches: list) -> tuple[dict, list[int]]:
    """(what the run validates on, the number of samples it trains on in each cache). A fraction is
    held out of each cache; a validation cache must hold the same teacher's targets, and its version
    is pinned like the training caches'."""
    from pipeline.train.validation import split_manifest

    if cfg.val_cache:
        held = open_cache(cfg.val_cache, store)
        diff = teacher_diff(caches[0].fingerprint, held.fingerprint)
        if diff:
            raise FingerprintMismatch(f"val_cache={cfg.val_cache} was made by another teacher than cache="
                                      f"{caches[0].url}; its targets are not what the student learns:\n  "
                                      + "\n  ".join(diff))
        return {"cache": cfg.val_cache, "version": held.version, "samples": len(held)}, [len(c) for c in caches]
    if cfg.val_fraction > 0:
        trained, held = [], 0
        for cache in caches:
            try:
                train, out = split_manifest(cache.samples, cfg.val_fraction, cfg.val_max_images)
            except ValueError as e:
                raise ConfigError(f"{cache.url}: {e}") from None
            trained.append(train.num_rows)
            held += out.num_rows
        return {"fraction": cfg.val_fraction, "max_images": cfg.val_max_images, "samples": held}, trained
    return {}, [len(c) for c in caches]


def _fit(cfg: TrainConfig, store: Storage, source: dict, fingerprint: dict, ds_json: dict,
         cache_version: int | list[int], validation: dict):
    """Ray Train's TorchTrainer over every rank's `train_loop` (`ds_json`: the user's DeepSpeed JSON,
    which the ranks merge into the config they build), fitted; returns its result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train.loop import train_loop

    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, "student": source, "fingerprint": fingerprint, "deepspeed_json": ds_json,
                           "cache_version": cache_version, "validation": validation},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name, **_ray_storage(cfg, store),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
    )
    return trainer.fit()


def _read_deepspeed_json(url: str | None, store: Storage) -> dict:
    """The user's DeepSpeed JSON, read once by the driver (workers may not share its files)."""
    if not url:
        return {}
    import json

    try:
        return json.loads(store.read_text(url))
    except (OSError, ValueError) as e:
        raise ConfigError(f"deepspeed_config={url}: {e}") from None


def _ray_storage(cfg: TrainConfig, store: Storage) -> dict:
    """`storage_path` (and `storage_filesystem`) for Ray Train's checkpoints.

    A local output is an absolute path. A remote one goes through the same fsspec filesystem as
    everything else (`Storage.pyarrow_filesystem`): the job's `storage_options` (an `endpoint_url`,
    keys) and its retry policy apply to checkpoints too, and a checkpoint file appears whole or not
    at all.
    """
    if storage.is_local(cfg.output):
        return {"storage_path": storage.resolve(cfg.output)}
    fs, path = store.pyarrow_filesystem(cfg.output)
    return {"storage_path": path, "storage_filesystem": fs}
