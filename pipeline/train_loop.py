"""What every Ray Train worker runs: DeepSpeed around the spar student, fed by `pipeline.loader`.

Checkpoints hold the trainable parameters, the ZeRO optimizer shards and the data position
(epoch, step in epoch, batches consumed per loader process); frozen weights come back from the
cache fingerprint. Every rank saves into a temp dir and reports it; Ray Train merges them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

import torch

import spar
from pipeline import loader, storage
from pipeline.cache import open_cache
from pipeline.config import to_dict
from pipeline.logs import rank_zero_info

log = logging.getLogger(__name__)
CKPT_TAG = "ds"


@dataclass
class RunState:
    """Position of the run; saved as DeepSpeed client state."""

    step: int = 0  # micro-steps done (all ranks step together)
    epoch: int = 0
    epoch_step: int = 0
    consumed: list[int] = field(default_factory=list)  # batches consumed per loader process this epoch
    samples: int = 0  # real samples this rank trained on
    world_size: int = 1


def resolve_precision(precision: str) -> str:
    """``auto``: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def deepspeed_config(cfg, world_size: int, extra: dict | None = None) -> dict:
    """The DeepSpeed config of the job config, with `extra` (the user's JSON file) merged over it."""
    precision = resolve_precision(cfg.precision)
    ds = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    _deep_update(ds, extra or {})
    return ds


def _deep_update(base: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


class Metrics:
    """Rank-0 metrics: CSV + TensorBoard in a local dir, mirrored to the run dir."""

    COLUMNS = ("kind", "step", "epoch", "loss", "samples_per_s", "tokens_per_s", "data_wait_share", "lr")

    def __init__(self, run_dir: str, enabled: bool):
        self.run_dir, self.enabled = run_dir, enabled
        self.local = tempfile.mkdtemp(prefix="spar-metrics-")
        self.csv = os.path.join(self.local, "metrics.csv")
        self.writer = None
        if enabled:
            remote = storage.join(run_dir, "metrics.csv")
            if storage.exists(remote):  # a resumed run appends
                storage.download(remote, self.csv)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(self.local, "tensorboard"))

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
        for k, v in row.items():
            if k not in ("step", "epoch", "kind"):
                self.writer.add_scalar(f"{row['kind']}/{k}", v, row["step"])

    def sync(self) -> None:
        """Copy CSV and event files to the run dir."""
        if not self.enabled:
            return
        self.writer.flush()
        for root, _, files in os.walk(self.local):
            for name in files:
                path = os.path.join(root, name)
                storage.upload(path, storage.join(self.run_dir, os.path.relpath(path, self.local)))

    def plot(self) -> None:
        """loss_curve.png from the CSV."""
        if not self.enabled or not os.path.exists(self.csv):
            return
        import csv

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with open(self.csv) as f:
            rows = [r for r in csv.DictReader(f) if r["kind"] == "step"]
        if not rows:
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], lw=1)
        ax.set(xlabel="step", ylabel="feature MSE" if "loss" in rows[0] else "loss", yscale="log",
               title="student vs teacher")
        ax.grid(alpha=0.3)
        path = os.path.join(self.local, "loss_curve.png")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        storage.upload(path, storage.join(self.run_dir, "loss_curve.png"))


def _setup_env() -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede the first deepspeed import


def build_engine(cfg, source: dict, world_size: int, ds_extra: dict | None = None):
    """The student (= teacher weights), trainable per spec, wrapped by `deepspeed.initialize`."""
    import deepspeed

    student = spar.load_backbone(source["backbone"], pretrained=source["pretrained"], init_seed=source["init_seed"])
    spar.set_trainable(student, cfg.trainable)
    student.drop_text_tower()  # never used here; export re-attaches it from the teacher's weights
    student.train()
    if cfg.activation_checkpointing:
        student.set_grad_checkpointing(True)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, model_parameters=params,
                                      config=deepspeed_config(cfg, world_size, ds_extra), dist_init_required=False)
    if world_size == 1 and engine.zero_optimization_stage() == 0:
        # One rank has nothing to average; DeepSpeed would still flatten, all-reduce and copy back.
        engine.enable_backward_allreduce = False
    return engine


def save_checkpoint(engine, state: RunState, metrics: dict) -> None:
    """Every rank saves its part into a temp dir and reports it; returns once it is committed."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="spar-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state={"run_state": state.__dict__},
                               exclude_frozen_parameters=True)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    # a report can be lost if this worker dies within the controller's poll interval: wait for it
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def load_checkpoint(engine, world_size: int) -> RunState:
    """Restore from Ray Train's latest checkpoint, if any."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return RunState(world_size=world_size)
    with ckpt.as_directory() as d:
        _, client = engine.load_checkpoint(d, tag=CKPT_TAG, load_module_strict=False)
    state = RunState(**client["run_state"])
    if state.world_size != world_size:
        log.warning("resuming with %d workers instead of %d: epoch %d restarts its data order",
                    world_size, state.world_size, state.epoch)
        state.epoch_step, state.consumed, state.world_size = 0, [], world_size
    log.info("resumed at step %d (epoch %d, step %d of the epoch)", state.step, state.epoch, state.epoch_step)
    return state


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


class Trainer:
    """One rank's training run: epochs of planned batches, checkpoints, metrics, export."""

    def __init__(self, config: dict):
        import ray.train

        self.cfg, self.source, self.fingerprint = config["cfg"], config["student"], config["fingerprint"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        for url in (self.cfg.cache, self.cfg.output):
            if self.cfg.storage_options:
                storage.configure(storage.protocol(url), self.cfg.storage_options)
        self.cache = open_cache(self.cfg.cache)
        self.refs = loader.manifest_refs(self.cache.manifest)
        self.engine = build_engine(self.cfg, self.source, self.world, config.get("deepspeed"))
        self.state = load_checkpoint(self.engine, self.world)
        rank_zero_info(log, "rank %d/%d on %s, %d torch threads, %d trainable parameters", self.rank, self.world,
                       self.device, torch.get_num_threads(),
                       sum(p.numel() for p in self.engine.module.parameters() if p.requires_grad))
        self.metrics = Metrics(self.cfg.run_dir, enabled=self.rank == 0)
        self.last_loss = float("nan")
        self.last_checkpoint_step = self.state.step if self.state.step else -1

    def done(self) -> bool:
        return self.cfg.max_steps is not None and self.state.step >= self.cfg.max_steps

    def fit(self) -> None:
        while self.state.epoch < self.cfg.epochs and not self.done():
            self.run_epoch()
        self.checkpoint()
        self.export()

    def run_epoch(self) -> None:
        cfg, st = self.cfg, self.state
        plan = loader.plan_epoch(self.refs, seed=cfg.seed, epoch=st.epoch, rank=self.rank, world_size=self.world,
                                 workers=cfg.data.loader_workers, batch_size=cfg.batch_size,
                                 shuffle_buffer=cfg.data.shuffle_buffer)
        if len(st.consumed) != cfg.data.loader_workers:
            st.consumed = [0] * cfg.data.loader_workers
        batches = iter(loader.make_loader(cfg.cache, plan, st.consumed, prefetch=cfg.data.prefetch,
                                          verify=cfg.data.verify_checksums, storage_options=cfg.storage_options))
        window = {"loss": 0.0, "n": 0, "wait": 0.0, "t0": time.perf_counter(), "samples": 0, "tokens": 0}
        epoch_loss = [0.0, 0.0]
        while st.epoch_step < plan.steps and not self.done():
            t = time.perf_counter()
            batch = next(batches, None)
            window["wait"] += time.perf_counter() - t
            real = batch is not None
            # A rank whose batches are used up (fewer than the longest rank's, or all consumed before a
            # resume) still steps with the others: a zero-weight padding step keeps the collectives in line.
            loss = self.step(batch if real else self.padding_batch(), weight=1.0 if real else 0.0)
            st.step, st.epoch_step = st.step + 1, st.epoch_step + 1
            if real:
                st.consumed[batch["worker"]] += 1
                n = len(batch["keys"])
                st.samples += n
                window["samples"] += n
                window["tokens"] += n * batch["target"].shape[1] * batch["target"].shape[2]
                window["loss"] += loss
                window["n"] += 1
                epoch_loss[0] += loss
                epoch_loss[1] += 1
            if st.step % cfg.log_every == 0:
                self.log_window(window)
            if cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0:
                self.checkpoint()
        total, count = _all_sum(epoch_loss, self.device)
        if st.epoch_step >= plan.steps:  # the epoch is complete (not cut by max_steps)
            self.last_loss = total / max(count, 1)
            self.metrics.log({"kind": "epoch", "step": st.step, "epoch": st.epoch, "loss": self.last_loss})
            st.epoch, st.epoch_step, st.consumed = st.epoch + 1, 0, [0] * cfg.data.loader_workers
            if not cfg.checkpoint_every:
                self.checkpoint()

    def padding_batch(self) -> dict:
        """One black window-sized image with a zero target: a forward/backward through every trainable
        parameter whose loss is then weighted by zero."""
        spec = spar.get_spec(self.source["backbone"])
        side, grid = spec.window, spec.window // spec.patch_size
        return {"image": torch.zeros(1, side, side, 3, dtype=torch.uint8),
                "target": torch.zeros(1, grid, grid, spec.dim)}

    def step(self, batch: dict, weight: float) -> float:
        """One forward/backward/step; returns the (unweighted) loss."""
        images = batch["image"].to(self.device, non_blocking=True)
        x = self.engine.module.normalize(images)
        target = loader.target_to_float(batch, self.device)
        pred = self.engine(x)
        loss = spar.feature_loss(pred, target, self.cfg.loss)
        self.engine.backward(loss * weight)
        self.engine.step()
        return float(loss.detach())

    def log_window(self, w: dict) -> None:
        loss_sum, n, samples, tokens, wait = _all_sum(
            [w["loss"], w["n"], w["samples"], w["tokens"], w["wait"]], self.device)
        elapsed = time.perf_counter() - w["t0"]
        row = {"kind": "step", "step": self.state.step, "epoch": self.state.epoch,
               "loss": loss_sum / max(n, 1), "samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed,
               "data_wait_share": wait / self.world / elapsed, "lr": self.cfg.lr}
        self.metrics.log(row)
        rank_zero_info(log, "step %d epoch %d loss %.5g | %.2f samples/s | data wait %.1f%%", row["step"],
                       row["epoch"], row["loss"], row["samples_per_s"], 100 * row["data_wait_share"])
        w.update(loss=0.0, n=0, wait=0.0, t0=time.perf_counter(), samples=0, tokens=0)

    def checkpoint(self) -> None:
        if self.state.step == self.last_checkpoint_step:
            return  # nothing new since the last one (e.g. the final checkpoint right after an epoch's)
        self.last_checkpoint_step = self.state.step
        self.metrics.sync()
        save_checkpoint(self.engine, self.state, {"step": self.state.step, "epoch": self.state.epoch,
                                                  "loss": self.last_loss, "samples": self.state.samples})

    def export(self) -> None:
        """student.safetensors (fp32 master weights over the teacher's frozen ones), student.json,
        the in-job features of a probe image, and the loss curve."""
        full, digest = {}, hashlib.sha256()
        for name, p in self.engine.module.named_parameters():
            if p.requires_grad:
                value = _fp32_param(p).detach().float().cpu()  # a collective under ZeRO: every rank calls it
                digest.update(value.numpy().tobytes())
                if self.rank == 0:
                    full[name] = value
        digests = _all_gather_str(digest.hexdigest()[:16])
        import ray

        nodes = _all_gather_str(ray.get_runtime_context().get_node_id())
        probe = next(iter(self.cache))
        with torch.no_grad():
            x = self.engine.module.normalize(torch.from_numpy(probe["image"]).to(self.device))
            in_job = self.engine(x).float().cpu()
        if self.rank == 0:
            self._write_student(full, probe, in_job, digests, nodes)
            self.metrics.plot()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()

    def _write_student(self, trained: dict, probe: dict, in_job: torch.Tensor, digests: list[str],
                       nodes: list[str]) -> None:
        import numpy as np

        from pipeline.encode import npy_bytes

        fresh = spar.load_backbone(self.source["backbone"], pretrained=self.source["pretrained"],
                                   init_seed=self.source["init_seed"])
        with torch.no_grad():
            for name, value in trained.items():
                fresh.get_parameter(name).copy_(value)
            exported_feats = fresh.dense(fresh.normalize(torch.from_numpy(probe["image"])))
        with tempfile.TemporaryDirectory() as tmp:
            path = spar.export_open_clip(fresh, os.path.join(tmp, "student.safetensors"))
            storage.upload(str(path), storage.join(self.cfg.run_dir, "student.safetensors"))
        storage.write_bytes(storage.join(self.cfg.run_dir, "probe_features.npy"), npy_bytes(in_job.numpy()))
        info = {
            "backbone": self.source["backbone"], "model_name": fresh.model_name, "weights": self.source["weights"],
            "cache": storage.public_url(self.cfg.cache), "cache_fingerprint": self.fingerprint["fingerprint"],
            "trainable": spar.trainable_parameter_names(fresh, self.cfg.trainable), "steps": self.state.step,
            "epochs_completed": self.state.epoch, "final_loss": self.last_loss,
            "precision": resolve_precision(self.cfg.precision), "probe_key": probe["key"],
            "probe_max_abs_diff": float((exported_feats - in_job).abs().max()),
            "rank_weight_digests": digests,  # sha256 of each rank's fp32 trainable weights: all equal
            "rank_nodes": nodes,  # Ray node id of each rank
            "config": to_dict(self.cfg), "created": time.time(),
        }
        storage.write_text(storage.join(self.cfg.run_dir, "student.json"),
                           json.dumps(info, indent=2, default=lambda o: np.asarray(o).tolist()))
        log.info("exported %s (probe max |diff| vs in-job features: %.3g)",
                 storage.public_url(storage.join(self.cfg.run_dir, "student.safetensors")), info["probe_max_abs_diff"])


def _all_gather_str(value: str) -> list[str]:
    import torch.distributed as dist

    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _fp32_param(p: torch.Tensor) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(p)
    return p.detach() if value is None else value


def train_loop(config: dict) -> None:
    """Ray Train entry point (``train_loop_per_worker``)."""
    _setup_env()
    logging.getLogger("pipeline").setLevel(logging.INFO)  # Ray already attached a handler to the root
    trainer = Trainer(config)
    trainer.fit()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # every rank leaves together (DeepSpeed can abort at exit otherwise)
