"""The training loop, the same for every task and every engine.

One optimizer step: gather the micro-batches of one global batch, back-propagate each with a weight
of 1 / (scored targets of the global batch), step; then log, validate, checkpoint. What is trained
on, and how it is scored, is the task's (megatron_lax.tasks): the loop only knows that a task gives
micro-batches, a model, a loss and validation metrics. How the model runs is the engine's
(megatron_lax.parallel): the loop never asks which one.
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import Config, ConfigError
from ..parallel import build_engine
from ..parallel.distributed import all_reduce_sum, barrier, broadcast_object, init_distributed, shutdown
from ..parallel import trust
from . import checkpoint, faults, introspection
from .metrics import MetricsLogger


class TrainingError(RuntimeError):
    pass


# Written to the run directory when the schedule completes (and removed when a run starts): a job
# script can tell a finished run from a preempted one (run_scripts/slurm_example.sbatch).
FINISHED = "finished.json"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG's state as tensors and plain data, which load without unpickling (weights_only)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores rng_state(), or the numpy tuple that checkpoints held before it."""
    random.setstate(state["python"])
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        numpy = (numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"],
                 numpy["gauss"])
    np.random.set_state(numpy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_device(batches: list, device: torch.device) -> list:
    return [(x.to(device), y.to(device)) for x, y in batches]


class Trainer:
    """Builds a run from a config and a task class, then `fit()` trains it to the end of its schedule
    (or a pause, a preemption or a divergence) and returns the run's summary."""

    LOSS_EMA = 0.9  # smoothing of the training loss for the spike rule (about 10 steps)

    def __init__(self, cfg: Config, task_class):
        self.dist = init_distributed(cfg.parallel.engine, cfg.train.device, cfg.parallel.backend)
        checkpoint.claim_run_dir(Path(cfg.logging.run_dir), cfg, self.dist)  # never writes over another run
        seed_everything(cfg.train.seed)
        per_step = cfg.train.micro_batch * self.dist.world_size
        if cfg.train.global_batch % per_step:
            raise ConfigError(f"train.global_batch {cfg.train.global_batch} is not a multiple of micro_batch x "
                              f"ranks = {per_step}")
        self.accumulation = cfg.train.global_batch // per_step
        self.task = task_class(cfg, self.dist)  # opens the data and completes its own copy of the config
        self.engine = build_engine(self.task.cfg, self.task.model(), self.dist, self.task.loss)
        self.task.attach(self.engine)
        self.cfg = self.task.cfg  # complete now: the model may have finished it (a fine-tuning base's shape)
        self.val_batches = to_device(self.task.validation_batches(), self.dist.device)
        self.select_batches = to_device(self.task.selection_batches(), self.dist.device)
        self.run_dir = Path(self.cfg.logging.run_dir)
        self.metrics = MetricsLogger(self.run_dir, self.dist.is_main, self.cfg.logging.tensorboard)
        self.step, self.seen, self.nonfinite_in_a_row, self.skipped_steps = 0, 0, 0, 0
        self.nonfinite = NonfiniteCounters(self.dist.device)
        # the divergence detector's state (train.stop_if_diverged): smoothed training loss, its running best
        self.loss_ema: float | None = None
        self.best_loss_ema = math.inf
        self.last_val: dict = {}
        self.best_val_loss = math.inf

    @property
    def loader(self):
        return self.task.loader

    def log(self, message: str) -> None:
        if self.dist.is_main:
            tqdm.write(message)

    # --- state ---------------------------------------------------------------------------------

    # The global count of scored units: a Python int, or while steps have not been read back on the
    # host, plus their counts on the device (summed, one host read, when something asks for it).
    @property
    def seen(self) -> int:
        if self.unseen:
            self._seen += int(sum(self.unseen))
            self.unseen = []
        return self._seen

    @seen.setter
    def seen(self, value: int) -> None:
        self._seen, self.unseen = value, []

    def trainer_state(self) -> dict:
        self.nonfinite_in_a_row, self.skipped_steps, _ = self.nonfinite.read()
        return {"step": self.step, "seen": self.seen, "skipped_steps": self.skipped_steps,
                "nonfinite_in_a_row": self.nonfinite_in_a_row, "best_val_loss": self.best_val_loss,
                "last_val": self.last_val, "loss_ema": self.loss_ema, "best_loss_ema": self.best_loss_ema}

    def load_trainer_state(self, state: dict) -> None:
        # the task's units trained on; checkpoints before the task's unit named the count "tokens"
        self.step, self.seen = state["step"], state["seen"] if "seen" in state else state["tokens"]
        self.skipped_steps, self.nonfinite_in_a_row = state["skipped_steps"], state["nonfinite_in_a_row"]
        self.nonfinite.set(self.nonfinite_in_a_row, self.skipped_steps)
        self.last_val = state["last_val"]
        if "best_val_loss" in state:
            self.best_val_loss = state["best_val_loss"]
        elif state.get("best_val_ppl", math.inf) < math.inf:  # written before tasks: the best perplexity
            self.best_val_loss = math.log(state["best_val_ppl"])
        self.loss_ema, self.best_loss_ema = state.get("loss_ema"), state.get("best_loss_ema", math.inf)

    def save_checkpoint(self, root: Path | None = None, keep: int | None = None) -> Path:
        rank_state = {"loader": self.loader.state_dict(), "rng": rng_state()}
        path = checkpoint.save(root or self.run_dir / "checkpoints", self.step, self.engine, self.trainer_state(),
                               rank_state, self.cfg, self.dist, keep or self.cfg.checkpoint.keep)
        if root is None:
            self.log(f"checkpoint: {path}")
        return path

    def periodic_checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint.every
        return bool(every) and self.step % every == 0 and self.step < self.task.total_steps

    def checkpoint_this_step(self) -> Path:
        """The checkpoint of the current step: the periodic one if it was just written, else a new one."""
        if self.periodic_checkpoint_due():
            return self.run_dir / "checkpoints" / checkpoint.step_dir_name(self.step)
        return self.save_checkpoint()

    def resume(self) -> None:
        path = checkpoint.resolve_resume(self.cfg.checkpoint.resume, self.run_dir, self.dist, self.log)
        if path is None:
            return
        self.task.check_resume(path)
        checkpoint.check_compatible(path, self.cfg)
        # DeepSpeed's pickled files: read with the user's flag, or from a checkpoint this run's key signed
        # at this very path (rank 0 holds the key; its verdict holds for every rank)
        own = broadcast_object(trust.proven(path) if self.dist.is_main else None)
        with trust.trusting(*([path] if own else []), everything=self.cfg.checkpoint.trust):
            state, loader_state, rng = checkpoint.load(path, self.engine, self.dist)
        self.load_trainer_state(state)
        self.loader.load_state_dict(loader_state)
        if rng is not None:
            set_rng_state(rng)
        self.log(f"resumed from {path} at step {self.step}")
        written_by = len(list(path.glob("rank_*.pt")))
        if written_by < self.dist.world_size:
            self.log(f"the checkpoint was written by {written_by} rank(s): ranks {written_by}-"
                     f"{self.dist.world_size - 1} keep the RNG state seeded from train.seed")

    # --- one optimizer step ----------------------------------------------------------------------

    def train_step(self) -> dict:
        """One optimizer step; its record read back on the host, the non-finite rule applied."""
        return self.settle(self.run_step())

    def run_step(self) -> dict:
        """One optimizer step without reading anything back from the device: the record's loss, grad
        norm and `skipped` stay device tensors (settle() reads them at logging steps)."""
        micro_batches = [next(self.loader) for _ in range(self.accumulation)]
        device = self.dist.device
        scored = sum(self.task.scored(y) for _, y in micro_batches)  # on the host: the loader's batches
        if self.dist.world_size > 1:  # a fill, not a copy: no wait for the device
            scored = all_reduce_sum(torch.full((), float(scored), device=device))
        total_loss = torch.zeros((), device=device)
        loss_weight = 1.0 / scored
        for i, (x, y) in enumerate(micro_batches):
            x, y = self.task.to_device(x, y)
            loss, _ = self.engine.forward_backward(x, y, loss_weight, sync=i == len(micro_batches) - 1)
            total_loss += loss.float()
        lr = self.task.learning_rate(self.step)
        result = self.engine.step(lr)
        loss = all_reduce_sum(total_loss) / scored
        self.step += 1
        self.unseen.append(scored)
        self.nonfinite.add(result.skipped, loss)
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": result.grad_norm, "skipped": result.skipped}

    def settle(self, record: dict) -> dict:
        """A run_step record as Python numbers (one host read) with the units seen; stops the run
        (TrainingError) if train.max_nonfinite non-finite steps came in a row since the last look."""
        values = torch.stack([torch.as_tensor(record[k], device=self.dist.device).float().reshape(())
                              for k in ("loss", "grad_norm", "skipped")]).tolist()
        record = {**record, "loss": values[0], "grad_norm": values[1], "skipped": int(values[2]),
                  self.task.unit: self.seen}
        self.nonfinite_in_a_row, self.skipped_steps, worst = self.nonfinite.read()
        if worst >= self.cfg.train.max_nonfinite:
            raise TrainingError(f"step {self.step}: {worst} non-finite steps in a row (loss {record['loss']}, grad "
                                f"norm {record['grad_norm']}); stopping. The last good checkpoint is left as it was.")
        return record

    # --- validation ---------------------------------------------------------------------------------

    def validate(self) -> dict:
        self.engine.train(False)
        metrics = self.task.evaluate(self.engine, self.val_batches, self.seen)
        self.engine.train(True)
        record = {"step": self.step, self.task.unit: self.seen, **metrics}
        self.last_val = record
        improved = record["val_loss"] < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, record["val_loss"])
        self.metrics.log(record, prefix="val")
        self.log(f"step {self.step}: {self.task.describe_validation(record)}")
        if improved and self.task.keep_best:
            self.save_checkpoint(self.run_dir / "best", keep=1)  # one checkpoint, replaced
        return record

    def select(self) -> dict:
        """{"select_loss"} on the selection slice ({} without one); logged, never reported."""
        if not self.select_batches:
            return {}
        self.engine.train(False)
        loss, count = self.task.evaluate_loss(self.engine, self.select_batches)
        self.engine.train(True)
        record = {"step": self.step, "select_loss": loss / max(count, 1), "select_tokens": count}
        self.metrics.log(record, prefix="select")
        return {"select_loss": record["select_loss"]}

    def selection_summary(self) -> dict:
        return {**self.select(), **(self.task.selection_baseline() if self.select_batches else {})}

    def diverged(self, loss: float) -> bool:
        """The stopping rule of LR sweeps: the training loss is non-finite, or its moving average
        (LOSS_EMA) has risen more than train.divergence_spike nats (default 1) above its own running
        best: a loss spike that a healthy run, whose smoothed loss wanders by a few hundredths of a
        nat, does not show. (A run that never leaves the unigram plateau does not spike; the sweep
        catches it at its pauses by comparing it with a context-free baseline, experiments.sweep.)"""
        if not math.isfinite(loss):
            return True
        self.loss_ema = loss if self.loss_ema is None else self.LOSS_EMA * self.loss_ema + (1 - self.LOSS_EMA) * loss
        self.best_loss_ema = min(self.best_loss_ema, self.loss_ema)
        return self.loss_ema > self.best_loss_ema + self.cfg.train.divergence_spike

    def log_latent_stats(self) -> None:
        """One forward on the first validation batch, on every rank (sharded engines need them all;
        a rank without a real validation sequence runs its fully-masked one); rank 0 logs."""
        if not self.val_batches or not any(introspection.lowrank_projections(self.engine.base_model)):
            return
        x, y = self.val_batches[0]
        self.engine.train(False)
        stats = introspection.latent_rms(self.engine.base_model, lambda: self.engine.eval_nll(x, y))
        self.engine.train(True)
        self.metrics.log({"step": self.step, **stats}, prefix="lax")

    # --- the loop ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.resume()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / FINISHED).unlink(missing_ok=True)
            checkpoint.write_run_config(self.run_dir, self.cfg, self.log)
            self.log(self.task.describe(self.engine))
        if self.cfg.logging.lax_stats_every and self.step == 0:
            self.log_latent_stats()  # the initialisation's latent scales, before any update
        self.engine.train(True)

    def fit(self) -> dict:
        self.start()
        bar = tqdm(total=self.task.total_steps, initial=self.step, dynamic_ncols=True, desc="train",
                   disable=not (self.dist.is_main and self.cfg.logging.progress))
        throughput = Throughput(self)
        stop = faults.StopFlag(self.dist.device)
        try:
            while self.step < self.task.total_steps:
                record = self.run_step()  # read back on the host at logging steps only (Throughput)
                throughput.add(record, bar)
                bar.update(1)
                ended = self.after_step(record, stop)
                if ended is not None:
                    return ended
            bar.close()
            return self.finish(throughput.start)
        finally:
            bar.close()
            self.metrics.close()
            checkpoint.release_run_dir(self.run_dir)

    def after_step(self, record: dict, stop: faults.StopFlag) -> dict | None:
        """Periodic work after a step; the run's summary if the run stops here."""
        t, lax_every = self.cfg.train, self.cfg.logging.lax_stats_every
        if lax_every and self.step % lax_every == 0:
            self.log_latent_stats()
        if t.eval_every and self.step % t.eval_every == 0 and self.step < self.task.total_steps:
            self.validate()
        if self.periodic_checkpoint_due():
            self.save_checkpoint()
        if t.stop_if_diverged and self.diverged(float(record["loss"])):  # a host read every step: sweeps only
            self.log(f"diverged at step {self.step}: loss {float(record['loss']):.4f} (smoothed {self.loss_ema:.4f}, its "
                     f"best {self.best_loss_ema:.4f}); stopping (train.stop_if_diverged)")
            self.metrics.log({"step": self.step, "diverged": 1}, prefix="event")
            return {"diverged": True, "steps": self.step, "loss": float(record["loss"]), "run_dir": str(self.run_dir)}
        if t.stop_after and t.stop_after <= self.step < self.task.total_steps:
            return self.pause()
        if stop.agreed():
            path = self.checkpoint_this_step()
            self.log(f"preempted by signal {stop.signal}: stopped after step {self.step}, checkpoint {path}")
            return {"preempted": True, "steps": self.step, "checkpoint": str(path)}
        return None

    def pause(self) -> dict:
        record = self.validate() if self.last_val.get("step") != self.step else self.last_val
        selection = self.selection_summary()
        path = self.checkpoint_this_step()
        self.log(f"paused after step {self.step} of {self.task.total_steps} (train.stop_after); resume with "
                 f"--checkpoint.resume auto")
        return {"paused": True, "steps": self.step, **self.task.summarize(record, self.best_val_loss)[0], **selection,
                "checkpoint": str(path), "run_dir": str(self.run_dir)}

    def finish(self, start: float) -> dict:
        final = self.validate()
        selection = self.selection_summary()
        path = self.save_checkpoint()
        fields, headline = self.task.summarize(final, self.best_val_loss)
        summary = {**fields, "steps": self.step, self.task.unit: self.seen, "seconds": time.time() - start,
                   "checkpoint": str(path), "run_dir": str(self.run_dir), **selection}
        baselines = self.task.baselines() if self.dist.is_main else {}
        if baselines:
            summary.update(baselines)
            self.metrics.log({"step": self.step, **baselines}, prefix="val")
        if self.dist.is_main:
            (self.run_dir / FINISHED).write_text(json.dumps(summary, indent=1))
        shown = ", ".join(f"{k.split('_')[0]} baseline {v:.2f}" for k, v in baselines.items())
        self.log(f"done: {headline}{' (' + shown + ')' if shown else ''}; "
                 f"{self.seen} {self.task.unit} in {summary['seconds']:.0f}s; checkpoint {path}; "
                 f"logs {self.run_dir / 'metrics.jsonl'}")
        return summary


class NonfiniteCounters:
    """The non-finite steps, counted on the device and read on the host only when asked: the current
    run of them, the longest run since the last read, and the total (skipped steps)."""

    def __init__(self, device: torch.device):
        self.run, self.longest, self.total = (torch.zeros((), dtype=torch.int64, device=device) for _ in range(3))

    def set(self, in_a_row: int, total: int) -> None:
        self.run.fill_(in_a_row)
        self.longest.fill_(in_a_row)
        self.total.fill_(total)

    def add(self, skipped, loss: torch.Tensor) -> None:
        bad = torch.as_tensor(skipped, device=loss.device) | ~torch.isfinite(loss)
        self.run = torch.where(bad, self.run + 1, 0)
        self.longest = torch.maximum(self.longest, self.run)
        self.total = self.total + bad

    def read(self) -> tuple[int, int, int]:
        """(non-finite steps in a row now, in total, the longest run since the last read): one host read."""
        run, total, longest = torch.stack([self.run, self.total, self.longest]).tolist()
        self.longest = self.run.clone()
        return run, total, longest


class Throughput:
    """Every logging.log_every steps: samples/s, FLOP/s, MFU, peak memory and the LaX gates, logged
    with the step's record."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.per_step, self.flops_per_unit = trainer.task.throughput_basis()  # per_step None: the units seen
        dist = trainer.dist
        cfg = trainer.cfg
        self.cluster_peak = dist.world_size * introspection.peak_flops(
            dist.device, cfg.logging.peak_flops, trainer.engine.precision, cfg.train.tf32)
        self.start = self.window_start = time.time()
        self.window, self.seen_before = 0, trainer.seen

    def add(self, record: dict, bar) -> None:
        """Counts a run_step record; at logging steps reads it back (in place) and logs it."""
        trainer = self.trainer
        self.window += self.per_step or 0
        if trainer.step % trainer.cfg.logging.log_every and trainer.step != trainer.task.total_steps:
            return
        record.update(trainer.settle(record))
        if self.per_step is None:  # the units the loss scored (padding excluded)
            self.window, self.seen_before = trainer.seen - self.seen_before, trainer.seen
        elapsed = time.time() - self.window_start
        rate_key = f"{trainer.task.unit}_per_s"
        record[rate_key] = self.window / max(elapsed, 1e-9)
        record["flops_per_s"] = record[rate_key] * self.flops_per_unit
        if self.cluster_peak > 0:
            record["mfu"] = record["flops_per_s"] / self.cluster_peak
        record["peak_memory_gb"] = introspection.peak_memory_gb(trainer.dist.device)
        record.update(introspection.gate_values(trainer.engine.base_model))
        trainer.metrics.log(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", rate=f"{record[rate_key]:.0f}")
        self.window_start, self.window = time.time(), 0


def fit_counting_per_step(trainer: Trainer, count) -> tuple[dict, dict[int, int]]:
    """trainer.fit() with `count()` (a running total such as host reads, or a tuple of them) taken as each
    step starts and once its periodic work is done: (the run's summary, {step: the growth in that step})."""
    per_step, run_step, after_step = {}, trainer.run_step, trainer.after_step
    at_start = [0]

    def counted_run_step():
        at_start[0] = count()
        return run_step()

    def counted_after_step(record, stop):
        ended = after_step(record, stop)
        now = count()
        per_step[trainer.step] = tuple(map(int.__sub__, now, at_start[0])) if isinstance(now, tuple) else now - at_start[0]
        return ended

    trainer.run_step, trainer.after_step = counted_run_step, counted_after_step
    try:
        return trainer.fit(), per_step
    finally:
        del trainer.run_step, trainer.after_step


def train(cfg: Config, task_class, exiting: bool = False) -> dict:
    """Runs one training and tears the process group down once every rank is done with it. `exiting`:
    the process ends with the run (a command), so preemption signals stay ignored until it has;
    otherwise the caller's signal handlers are back once the run is over."""
    previous = faults.preemption_handlers()  # the run installs its own (faults.StopFlag)
    try:
        summary = Trainer(cfg, task_class).fit()
        faults.ignore_preemption_signals()
        barrier()  # no rank tears its process group down while another still uses it
        return summary
    finally:
        checkpoint.release_run_dir(Path(cfg.logging.run_dir))
        shutdown()
        if not exiting:
            faults.restore_signals(previous)
