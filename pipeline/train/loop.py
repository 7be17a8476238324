"""What every Ray Train worker runs: epochs of planned batches through the DeepSpeed student.

    train_loop(config)            Ray Train's entry point on every rank
      Trainer.__init__            resolve the precision on the ranks' devices, build the engine, restore the
                                  latest checkpoint (same seed), open the pinned cache
        Trainer.open_validation   the held-out samples (by key hash, or a second cache) and the rows to train on
        Trainer.start_segment     a resume on another layout: re-plan the rest of the epoch
      Trainer.fit                 epochs -> final checkpoint -> export
        Trainer.run_epoch         this rank's planned batches in plan order, padding steps, checkpoints
          Trainer.step            forward, MSE against the cached target, backward, optimizer step
          Trainer.validate        held-out MSE vs the untrained single pass (at the start and each epoch end)
          Window                  the running numbers behind each metrics row
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch

import spar
from spar.weights import verified_weights
from pipeline import retry
from pipeline.cache.reader import open_cache
from pipeline.devices import keep_freed_memory
from pipeline.logs import duration, rank_zero_info
from pipeline.storage import Storage, public_url
from pipeline.train import epochs, loader, validation
from pipeline.train.checkpoint import (CheckpointError, RunState, check_mixture, check_seed, load_checkpoint,
                                       pack_positions, save_checkpoint, unpack_positions)
from pipeline.train.collectives import all_gather_str, all_sum, barrier
from pipeline.train.engine import build_engine, deepspeed_config, setup_env, worker_precision
from pipeline.train.export import gather_trained, probe_features, run_record, write_student
from pipeline.train.metrics import KeyLog, Metrics

log = logging.getLogger(__name__)


@dataclass
class Window:
    """Sums since the last metrics row (and over the epoch, for its loss)."""

    loss: float = 0.0
    n: int = 0
    wait: float = 0.0
    samples: int = 0
    tokens: int = 0
    retries: int = 0  # storage retries of the loader processes (each read retried in place)
    by_cache: dict = field(default_factory=dict)  # a mixture: samples of each cache (index -> count)
    t0: float = field(default_factory=time.perf_counter)

    def add(self, batch: dict, loss: float) -> None:
        """Count one real (non-padding) batch."""
        n = len(batch["keys"])
        self.samples += n
        self.tokens += n * batch["target"].shape[1] * batch["target"].shape[2]
        self.loss += loss
        self.n += 1
        self.retries += int(batch.get("retries", 0))
        for c in batch.get("caches", ()):
            self.by_cache[c] = self.by_cache.get(c, 0) + 1

    def row(self, step: int, epoch: int, lr: float, world: int, device: torch.device) -> dict:
        """The metrics row of this window, summed over ranks."""
        own = sum(retry.take_counts().values())  # this rank's: checkpoints, metrics, key records
        loss_sum, n, samples, tokens, wait, retries = all_sum(
            [self.loss, self.n, self.samples, self.tokens, self.wait, self.retries + own], device)
        elapsed = time.perf_counter() - self.t0
        return {"kind": "step", "step": step, "epoch": epoch, "loss": loss_sum / max(n, 1),
                "samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed,
                "data_wait_share": wait / world / elapsed, "lr": lr, "storage_retries": int(retries)}


class Trainer:
    """One rank's training run: epochs of planned batches, checkpoints, metrics, export."""

    def __init__(self, config: dict):
        import ray.train

        cfg = self.cfg = config["cfg"]
        self.source, self.fingerprint = config["student"], config["fingerprint"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            keep_freed_memory()
        # precision=auto follows the devices the ranks got, not the driver's (a CPU head node has none);
        # the config built here is the one that runs, and the one checkpoints and student.json record
        self.precision = worker_precision(cfg.precision, self.device)
        self.ds_config = deepspeed_config(cfg, self.world, config["deepspeed_json"], self.precision)
        self.store = Storage(cfg.storage_options)
        options = self.store.weights_options(self.source["pretrained"] or "")
        # this node's copy of the weights, checked against the cache's fingerprint (the export loads it too)
        self.source = {**self.source, "pretrained": self.store.call("weights", self.source["pretrained"] or "", lambda:
                       verified_weights(self.source["pretrained"], self.source["weights"], options))}
        self.engine = build_engine(cfg, self.source, self.ds_config, options)
        self.layout = {"world_size": self.world, "loader_workers": cfg.data.loader_workers,
                       "batch_size": cfg.batch_size, "shuffle_buffer": cfg.data.shuffle_buffer,
                       "grad_accum": cfg.grad_accum, "planner": epochs.PLANNER}
        self.info = {"source": {"backbone": self.source["backbone"], "weights": self.source["weights"]},
                     "deepspeed": self.ds_config}
        self.state = load_checkpoint(self.engine, self.info) or RunState(layout=self.layout, seed=cfg.seed,
                                                                         mixture=cfg.mixture())
        # the driver checked the seed and caches already; this checkpoint may be newer than the one it read
        check_seed(self.state.seed, cfg.seed, f"the run {public_url(cfg.run_dir)}")
        check_mixture(self.state.mixture, cfg.mixture(), f"the run {public_url(cfg.run_dir)}")
        self.state.seed = cfg.seed  # a checkpoint that predates the seed's record takes this run's
        # The run reads one snapshot of each cache from start to end: the versions its driver pinned, or
        # those its checkpoint recorded when this is a resume (a cache may have grown since).
        if self.state.cache_version is None:
            self.state.cache_version = config["cache_version"]
        elif self.state.cache_version != config["cache_version"]:
            rank_zero_info(log, "resuming on cache version(s) %s, pinned by the run (now at %s)",
                           self.state.cache_version, config["cache_version"])
        pinned = self.state.cache_version
        pinned = pinned if isinstance(pinned, list) else [pinned]
        self.caches = [open_cache(url, self.store, version=v) for url, v in zip(cfg.caches, pinned)]
        self.cache = self.caches[0]
        self.held, training = self.open_validation(config["validation"])
        tables = [epochs.SampleTable.from_table(rows) for rows in training]
        self.samples = epochs.SampleTable.concat(tables)
        if cfg.mix is not None:
            self.samples = self.samples.with_draw(epochs.draw_counts([len(t) for t in tables], cfg.mix,
                                                                     cfg.epoch_samples))
        self.mixed = len(self.caches) > 1
        if self.mixed and self.state.epoch_cache_samples is None:
            self.state.epoch_cache_samples = [0] * len(self.caches)
        if self.state.layout != self.layout:
            self.start_segment()
        rank_zero_info(log, "rank %d/%d on %s, %d torch threads, %d trainable parameters", self.rank, self.world,
                       self.device, torch.get_num_threads(),
                       sum(p.numel() for p in self.engine.module.parameters() if p.requires_grad))
        self.metrics = Metrics(cfg.run_dir, self.store, enabled=self.rank == 0)
        self.keys = KeyLog(cfg.run_dir, self.store, self.rank, enabled=cfg.record_keys)
        self.epoch_sums = Window()  # this rank's batches of the epoch since the state's epoch_loss was summed
        self.last_loss = float("nan")
        self.saved = asdict(self.state) if self.state.step else None

    def open_validation(self, chosen: dict):
        """(this rank's held-out samples of each cache, or of the validation cache, or none; the
        manifest rows to train on, per cache). A resume keeps the split its run started with (another
        would change the training set under its checkpoint)."""
        st = self.state
        # a run that started before held-out sets were capped keeps its uncapped split
        ignored = {"samples", "version"} | ({"max_images"} if st.validation and "max_images" not in st.validation else set())
        if st.validation is None:
            st.validation = {k: v for k, v in chosen.items() if k != "samples"}
        elif {k: v for k, v in chosen.items() if k not in ignored} != \
                {k: v for k, v in st.validation.items() if k != "version"}:
            raise CheckpointError(f"this run started with validation {st.validation or 'none'}, now {chosen or 'none'}: "
                                  "the training set would change under its checkpoint; keep val_fraction / val_cache "
                                  "as they were, or use a new run name")
        rows = [c.samples for c in self.caches]
        if "fraction" in st.validation:
            split = [validation.split_manifest(r, st.validation["fraction"], st.validation.get("max_images"))
                     for r in rows]
            return [validation.HeldOut(c.url, self.store, held, self.rank, self.world)
                    for c, (_, held) in zip(self.caches, split)], [train for train, _ in split]
        if "cache" in st.validation:
            other = open_cache(st.validation["cache"], self.store, version=st.validation["version"])
            return [validation.HeldOut(other.url, self.store, other.samples, self.rank, self.world)], rows
        return [], rows

    def validate(self) -> None:
        """Score the held-out samples (every rank its share, summed); the first call, before any step,
        measures the untrained single pass. A mixture held out per cache is also scored per cache."""
        if not self.held:
            return
        st = self.state
        padding = self.padding_batch()["image"]
        sums = all_sum([x for held in self.held for x in validation.score(self.engine, held, self.device, padding)],
                       self.device)
        total, n = sum(sums[0::2]), sum(sums[1::2])
        if len(self.held) > 1:
            self.validate_per_cache(sums)
        mse = total / max(n, 1)
        if st.val_baseline is None:
            st.val_baseline = mse
        st.val_mse = mse
        ratio = mse / st.val_baseline if st.val_baseline > 0 else float("nan")
        self.metrics.log({"kind": "val", "step": st.step, "epoch": st.epoch, "val_mse": mse,
                          "baseline_mse": st.val_baseline, "val_ratio": ratio, "samples": int(n)})
        rank_zero_info(log, "validation at step %d: MSE %.5g on %d held-out samples, %.3f x the untrained single "
                       "pass (%.5g)", st.step, mse, n, ratio, st.val_baseline)

    def validate_per_cache(self, sums: list[float]) -> None:
        """One val row per cache of a mixture (its held-out MSE and its own baseline)."""
        st = self.state
        if st.val_by_cache is None:
            st.val_by_cache = [{"baseline_mse": None, "val_mse": None} for _ in self.held]
        for i, record in enumerate(st.val_by_cache):
            mse = sums[2 * i] / max(sums[2 * i + 1], 1)
            if record["baseline_mse"] is None:
                record["baseline_mse"] = mse
            record["val_mse"] = mse
            base = record["baseline_mse"]
            self.metrics.log({"kind": "val", "step": st.step, "epoch": st.epoch, "cache": i, "val_mse": mse,
                              "baseline_mse": base, "val_ratio": mse / base if base > 0 else float("nan"),
                              "samples": int(sums[2 * i + 1])})

    def start_segment(self) -> None:
        """Resuming on another layout (ranks, loader processes, batch size, ...): the samples the old
        layout trained this epoch are marked done and the rest of the epoch is planned over the new one."""
        st, cfg = self.state, self.cfg
        n = self.samples.epoch_length
        if st.layout.get("planner") != epochs.PLANNER and (st.epoch_step or st.done):
            log.warning("the checkpoint is %d steps into epoch %d, planned by an earlier version of the epoch planner "
                        "whose batches this version cannot reproduce: the epoch restarts from its first step (its "
                        "samples trained so far are trained again)", st.epoch_step, st.epoch)
            st.epoch_step, st.done = 0, ""
        done = epochs.trained_positions(self.samples, seed=cfg.seed, epoch=st.epoch, layout=st.layout,
                                        steps=st.epoch_step, done=unpack_positions(st.done, n), segment=st.segment)
        trained = int(done.sum())
        rank_zero_info(log, "resuming epoch %d on %d rank(s) x %d loader process(es), checkpointed on %d x %d: "
                       "%d of its %d samples are trained, the other %d are planned over the new layout", st.epoch,
                       self.world, cfg.data.loader_workers, st.layout["world_size"], st.layout["loader_workers"],
                       trained, n, n - trained)
        st.done = pack_positions(done) if trained else ""
        st.segment, st.epoch_step, st.layout = st.segment + (1 if trained else 0), 0, self.layout

    def done(self) -> bool:
        return self.cfg.max_steps is not None and self.state.step >= self.cfg.max_steps

    def fit(self) -> None:
        if self.state.val_baseline is None:
            self.validate()  # the baseline: the student's weights are still the teacher's
        while self.state.epoch < self.cfg.epochs and not self.done():
            self.run_epoch()
        self.checkpoint()
        self.keys.flush()
        self.export()

    def run_epoch(self) -> None:
        cfg, st = self.cfg, self.state
        plan = epochs.plan_epoch(self.samples, seed=cfg.seed, epoch=st.epoch, rank=self.rank, world_size=self.world,
                                 workers=cfg.data.loader_workers, batch_size=cfg.batch_size,
                                 shuffle_buffer=cfg.data.shuffle_buffer,
                                 done=unpack_positions(st.done, self.samples.epoch_length),
                                 segment=st.segment, step_multiple=cfg.grad_accum)
        order = plan.order()
        remaining = plan.steps - st.epoch_step + (cfg.epochs - st.epoch - 1) * plan.steps  # later epochs: about as long
        self.total_steps = min(st.step + remaining, cfg.max_steps or 2**62)
        batches = iter(loader.make_loader(cfg.caches, self.store, plan, st.epoch_step, prefetch=cfg.data.prefetch,
                                          verify=cfg.data.verify_checksums))
        window = Window()
        while st.epoch_step < plan.steps and not self.done():
            s = st.epoch_step
            t = time.perf_counter()
            batch = next(batches) if s < len(order) else None
            window.wait += time.perf_counter() - t
            if batch is not None and (batch["worker"], batch["index"]) != order[s]:
                raise RuntimeError(f"step {s} of epoch {st.epoch}: the loader gave batch {batch['index']} of process "
                                   f"{batch['worker']}, the plan has {order[s]}")
            # Every rank steps together. A rank whose batches are used up runs a padding step of weight 0;
            # real batches are weighted so that the update averages over the real samples of the
            # accumulation window, however many ranks had them (DeepSpeed averages over ranks and steps).
            n = len(batch["keys"]) if batch is not None else 0
            weight = self.world * cfg.grad_accum * n / plan.window_samples(s, cfg.grad_accum)
            loss = self.step(batch if batch is not None else self.padding_batch(), weight)
            st.step, st.epoch_step = st.step + 1, st.epoch_step + 1
            st.samples += plan.step_samples[s]
            st.epoch_samples += plan.step_samples[s]
            if batch is not None:
                self.keys.add(st.epoch, st.step - 1, batch["keys"], loss, batch["caches"])
                window.add(batch, loss)
                self.epoch_sums.add(batch, loss)
            if st.step % cfg.log_every == 0:
                row = window.row(st.step, st.epoch, cfg.lr, self.world, self.device)
                self.log_row(row, (self.total_steps - st.step) * (time.perf_counter() - window.t0) / cfg.log_every)
                window = Window()
            if cfg.val_every and st.step % cfg.val_every == 0:
                self.validate()
            if cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0:
                self.checkpoint()
        if st.epoch_step >= plan.steps:  # the epoch is complete (not cut by max_steps)
            if not (cfg.val_every and st.step % cfg.val_every == 0):
                self.validate()
            self.sum_epoch()
            self.last_loss = st.epoch_loss / max(st.epoch_batches, 1)
            self.metrics.log({"kind": "epoch", "step": st.step, "epoch": st.epoch, "loss": self.last_loss,
                              "samples": st.epoch_samples})
            for i, n in enumerate(st.epoch_cache_samples or []):  # a mixture: what each cache gave the epoch
                self.metrics.log({"kind": "epoch", "step": st.step, "epoch": st.epoch, "cache": i, "samples": n})
            st.epoch, st.epoch_step, st.segment, st.done, st.layout = st.epoch + 1, 0, 0, "", self.layout
            st.epoch_loss, st.epoch_batches, st.epoch_samples = 0.0, 0, 0
            if self.mixed:
                st.epoch_cache_samples = [0] * len(self.caches)
            if not cfg.checkpoint_every:
                self.checkpoint()

    def sum_epoch(self) -> None:
        """Add every rank's batch losses since the last sum to the state (a collective)."""
        counts = [self.epoch_sums.by_cache.get(i, 0) for i in range(len(self.caches))] if self.mixed else []
        loss, n, *counts = all_sum([self.epoch_sums.loss, self.epoch_sums.n, *counts], self.device)
        self.state.epoch_loss += loss
        self.state.epoch_batches += int(n)
        if self.mixed:
            self.state.epoch_cache_samples = [a + int(b) for a, b in zip(self.state.epoch_cache_samples, counts)]
        self.epoch_sums = Window()

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

    def log_row(self, row: dict, eta_s: float) -> None:
        self.metrics.log(row)
        rank_zero_info(log, "step %d/%d epoch %d/%d loss %.5g | %.2f samples/s | data wait %.1f%% | ETA %s",
                       row["step"], self.total_steps, row["epoch"] + 1, self.cfg.epochs, row["loss"],
                       row["samples_per_s"], 100 * row["data_wait_share"], duration(eta_s))

    def checkpoint(self) -> None:
        """Save the run (every rank); a no-op when nothing changed since the last save."""
        self.sum_epoch()
        if asdict(self.state) == self.saved:
            return
        self.saved = asdict(self.state)
        self.keys.flush()
        self.metrics.sync()
        save_checkpoint(self.engine, self.state, {"step": self.state.step, "epoch": self.state.epoch,
                                                  "loss": self.last_loss, "samples": self.state.samples},
                        self.info, self.rank)

    def export(self) -> None:
        """student.safetensors, student.json, the probe's in-job features, and the loss curve."""
        import ray

        trained, digests = gather_trained(self.engine, keep=self.rank == 0)
        nodes = all_gather_str(ray.get_runtime_context().get_node_id())
        probe = next(iter(self.cache))
        in_job = probe_features(self.engine, probe, self.device)
        if self.rank == 0:
            record = run_record(self.cfg, self.fingerprint, self.state, self.last_loss, digests, nodes,
                                self.ds_config, self.precision, self.caches, self.samples)
            write_student(self.store, self.cfg.run_dir, self.source, self.cfg.trainable, trained, record, probe, in_job)
            self.metrics.plot(self.cfg.loss)
        for held in self.held:
            held.close()
        barrier()


def train_loop(config: dict) -> None:
    """Ray Train entry point (``train_loop_per_worker``)."""
    setup_env()
    logging.getLogger("pipeline").setLevel(logging.INFO)  # Ray already attached a handler to the root
    Trainer(config).fit()
    barrier()  # every rank leaves together (DeepSpeed can abort at exit otherwise)
