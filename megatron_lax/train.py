"""Pre-training entry point:  python -m megatron_lax.train --config FILE [--section.key value ...]

The loop is the same on every engine: gather the micro-batches of one global batch, back-propagate
each with a weight of 1 / (scored tokens of the global batch), step, log, validate, checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint, data, faults, introspection, streaming
from .config import Config, ConfigError, add_config_arguments, config_from_args, dump_yaml
from .evaluate import evaluate_nll
from .metrics import MetricsLogger
from .models import build_model
from .models.llama import count_parameters, flops_per_token, init_weights
from .optim import lr_at
from .parallel import ModelRecipe, build_engine
from .parallel.distributed import DistInfo, all_reduce_sum, barrier, end_process, init_distributed, shutdown


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
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prepare_data(cfg: Config, dist: DistInfo) -> tuple[Path, dict]:
    """Prepares the shards on rank 0 if needed, and sizes the vocabulary from the tokenizer."""
    if dist.is_main:
        data.ensure_prepared(cfg.data)
    barrier()
    manifest = data.read_manifest(cfg.data.path)
    cfg.model.vocab_size = data.model_vocab_size(manifest, cfg.model.vocab_size)
    return Path(cfg.data.path), manifest


class Trainer:
    unit = "tokens"  # what train_step counts in self.tokens
    stream = None  # a streaming.Stream when data.source is stream

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dist = init_distributed(cfg.parallel.engine, cfg.train.device, cfg.parallel.backend)
        seed_everything(cfg.train.seed)
        t = cfg.train
        per_step = t.micro_batch * self.dist.world_size
        if t.global_batch % per_step:
            raise ConfigError(f"train.global_batch {t.global_batch} is not a multiple of micro_batch x ranks = {per_step}")
        self.accumulation = t.global_batch // per_step
        self.build_data()
        self.engine = build_engine(cfg, self.build_model(), self.dist)
        self.val_batches = [(x.to(self.dist.device), y.to(self.dist.device)) for x, y in self.validation_batches()]
        self.select_batches = [(x.to(self.dist.device), y.to(self.dist.device)) for x, y in self.selection_batches()]
        self.run_dir = Path(cfg.logging.run_dir)
        self.metrics = MetricsLogger(self.run_dir, self.dist.is_main, cfg.logging.tensorboard)
        self.step, self.tokens, self.nonfinite_in_a_row, self.skipped_steps = 0, 0, 0, 0
        # the divergence detector's state (train.stop_if_diverged): smoothed training loss, its running best
        self.loss_ema: float | None = None
        self.best_loss_ema = math.inf
        self.last_val: dict = {}
        self.best_val_ppl = math.inf

    # --- what a subclass (megatron_lax.finetune) replaces ----------------------------------------------

    def build_data(self) -> None:
        """Sets self.loader (this rank's micro-batches), self.n_params and self.total_steps."""
        cfg, t = self.cfg, self.cfg.train
        if cfg.data.source == "stream":
            self.stream = streaming.Stream(cfg.data, self.dist.rank, self.dist.world_size)
            cfg.model.vocab_size = self.stream.model_vocab_size(cfg.model.vocab_size)
            self.loader = self.stream.train_loader(t.global_batch, t.micro_batch, t.allow_repetition)
            self.n_params = count_parameters(cfg.model)
            self.total_steps = data.planned_steps(t, cfg.model, cfg.data.seq_len, self.n_params)  # no size to check
            return
        self.data_path, _ = prepare_data(cfg, self.dist)
        self.loader = data.TrainLoader(self.data_path, cfg.data.seq_len, cfg.data.mode, t.global_batch,
                                       t.micro_batch, self.dist.rank, self.dist.world_size, cfg.data.seed,
                                       t.allow_repetition)
        self.n_params = count_parameters(cfg.model)
        self.total_steps = data.resolve_steps(t, cfg.model, cfg.data.seq_len, self.loader.total_tokens, self.n_params)
        if self.total_steps > self.loader.steps_per_epoch and not t.allow_repetition:
            raise ValueError(f"{self.total_steps} steps need {self.total_steps * t.global_batch:,} sequences but the "
                             f"prepared data ({cfg.data.mode} mode) offers {self.loader.sequences_per_epoch:,} per "
                             f"epoch; add data or set train.allow_repetition true")

    def build_model(self) -> ModelRecipe | torch.nn.Module:
        """A recipe (the engine builds the model on the meta device or partitioned, then initialises
        it) or a built model."""
        cfg = self.cfg
        return ModelRecipe(build=lambda: build_model(cfg.model, init_seed=None),
                           initialize=lambda model: init_weights(model, cfg.train.seed))

    def validation_batches(self) -> list:
        cfg, t = self.cfg, self.cfg.train
        if self.stream:
            return self.stream.validation_batches(t.micro_batch, t.eval_tokens or cfg.data.val_tokens)
        return data.validation_batches(self.data_path, cfg.data.seq_len, t.micro_batch,
                                       t.eval_tokens or cfg.data.val_tokens, cfg.data.mode, self.dist.rank,
                                       self.dist.world_size)

    def selection_batches(self) -> list:
        """The selection slice (train.select_tokens; none when 0): validation sequences after the reported
        ones, which LR sweeps choose on so that the reported tokens take no part in any choice."""
        cfg, t = self.cfg, self.cfg.train
        if not t.select_tokens:
            return []
        if self.stream:
            return self.stream.validation_batches(t.micro_batch, t.select_tokens, t.eval_tokens or cfg.data.val_tokens)
        return data.validation_batches(self.data_path, cfg.data.seq_len, t.micro_batch, t.select_tokens,
                                       cfg.data.mode, self.dist.rank, self.dist.world_size,
                                       after_tokens=t.eval_tokens or cfg.data.val_tokens)

    def selection_baseline(self) -> dict:
        """{"select_chance_loss": the loss of a context-free model on the selection slice} (main rank):
        a run that does no better has learned nothing usable (the sweep's plateau rule). A subclass
        without such a baseline returns {} and the rule is off."""
        cfg, t = self.cfg, self.cfg.train
        if self.stream:
            return {"select_chance_loss": math.log(self.stream.unigram_perplexity(
                t.select_tokens, t.eval_tokens or cfg.data.val_tokens))}
        ppl = data.unigram_perplexity(self.data_path, cfg.data.seq_len, cfg.data.mode, t.select_tokens,
                                      after_tokens=t.eval_tokens or cfg.data.val_tokens)
        return {"select_chance_loss": math.log(ppl)}

    def learning_rate(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.cfg.optim)

    def describe(self) -> str:
        cfg, t = self.cfg, self.cfg.train
        return (f"model: {cfg.model.method}{' + LaX (' + cfg.model.lax_gate + ')' if cfg.model.uses_lax else ''}, "
                f"{self.n_params / 1e6:.2f}M parameters; {self.total_steps} steps of {t.global_batch} x "
                f"{cfg.data.seq_len} tokens on {self.dist.world_size} rank(s), engine {cfg.parallel.engine}, "
                f"precision {self.engine.precision}")

    def throughput_basis(self) -> tuple[float, float]:
        """(tokens per optimizer step, training FLOPs per token) for tokens/s and MFU."""
        cfg = self.cfg
        return cfg.train.global_batch * cfg.data.seq_len, flops_per_token(cfg.model, cfg.data.seq_len)["train"]

    def baselines(self) -> dict:
        """Reference numbers logged beside the final validation (main rank only)."""
        cfg = self.cfg
        if self.stream:
            return {"unigram_ppl": self.stream.unigram_perplexity(cfg.train.eval_tokens or cfg.data.val_tokens)}
        return {"unigram_ppl": data.unigram_perplexity(self.data_path, cfg.data.seq_len, cfg.data.mode,
                                                       cfg.train.eval_tokens or cfg.data.val_tokens)}

    def scored(self, targets: torch.Tensor) -> int:
        """How many targets of a micro-batch the loss scores (padding is not)."""
        return int((targets != data.IGNORE).sum())

    def summarize(self, final: dict) -> tuple[dict, str]:
        """The end-of-run summary's validation fields and how they read in the last line."""
        return ({"val_ppl": final["val_ppl"], "val_loss": final["val_loss"], "val_tokens": final["val_tokens"],
                 "best_val_ppl": self.best_val_ppl},
                f"validation perplexity {final['val_ppl']:.2f} on {final['val_tokens']} tokens")

    def log(self, message: str) -> None:
        if self.dist.is_main:
            tqdm.write(message)

    # --- state ---------------------------------------------------------------------------------

    def trainer_state(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "skipped_steps": self.skipped_steps,
                "nonfinite_in_a_row": self.nonfinite_in_a_row, "best_val_ppl": self.best_val_ppl,
                "last_val": self.last_val, "loss_ema": self.loss_ema, "best_loss_ema": self.best_loss_ema}

    def save_checkpoint(self) -> Path:
        rank_state = {"loader": self.loader.state_dict(), "rng": rng_state()}
        path = checkpoint.save(self.run_dir / "checkpoints", self.step, self.engine, self.trainer_state(),
                               rank_state, self.cfg, self.dist, self.cfg.checkpoint.keep)
        self.log(f"checkpoint: {path}")
        return path

    def periodic_checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint.every
        return bool(every) and self.step % every == 0 and self.step < self.total_steps

    def checkpoint_this_step(self) -> Path:
        """The checkpoint of the current step: the periodic one if it was just written, else a new one."""
        if self.periodic_checkpoint_due():
            return self.run_dir / "checkpoints" / checkpoint.step_dir_name(self.step)
        return self.save_checkpoint()

    def resume(self) -> None:
        path = checkpoint.resolve_resume(self.cfg.checkpoint.resume, self.run_dir, self.dist, self.log)
        if path is None:
            return
        checkpoint.check_compatible(path, self.cfg)
        state, loader_state, rng = checkpoint.load(path, self.engine, self.dist)
        self.step, self.tokens = state["step"], state["tokens"]
        self.skipped_steps, self.nonfinite_in_a_row = state["skipped_steps"], state["nonfinite_in_a_row"]
        self.best_val_ppl, self.last_val = state["best_val_ppl"], state["last_val"]
        self.loss_ema, self.best_loss_ema = state.get("loss_ema"), state.get("best_loss_ema", math.inf)
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
        micro_batches = [next(self.loader) for _ in range(self.accumulation)]
        device = self.dist.device
        scored = all_reduce_sum(torch.tensor(float(sum(self.scored(y) for _, y in micro_batches)), device=device))
        total_nll = torch.zeros((), device=device)
        loss_weight = float("nan") if self.step + 1 in faults.NAN_STEPS else 1.0 / float(scored)
        for i, (x, y) in enumerate(micro_batches):
            nll, _ = self.engine.forward_backward(x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                                                  loss_weight, sync=i == len(micro_batches) - 1)
            total_nll += nll.float()
        lr = self.learning_rate(self.step)
        result = self.engine.step(lr)
        loss = float(all_reduce_sum(total_nll) / scored)
        self.step += 1
        self.tokens += int(scored)
        if result.skipped or not math.isfinite(loss):
            self.skipped_steps += 1
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite:
                raise TrainingError(f"step {self.step}: {self.nonfinite_in_a_row} non-finite steps in a row "
                                    f"(loss {loss}, grad norm {result.grad_norm}); stopping. The last good "
                                    f"checkpoint is left as it was.")
        else:
            self.nonfinite_in_a_row = 0
        return {"step": self.step, "loss": loss, "lr": lr, "tokens": self.tokens, "grad_norm": result.grad_norm,
                "skipped": int(result.skipped)}

    def validate(self) -> dict:
        self.engine.train(False)
        nll, count = evaluate_nll(self.engine, self.val_batches)
        self.engine.train(True)
        val_loss = nll / max(count, 1)
        record = {"step": self.step, "tokens": self.tokens, "val_loss": val_loss,
                  "val_ppl": math.exp(min(val_loss, 50.0)), "val_tokens": count}
        self.last_val = record
        self.best_val_ppl = min(self.best_val_ppl, record["val_ppl"])
        self.metrics.log(record, prefix="val")
        self.log(f"step {self.step}: val_loss {val_loss:.4f}  val_ppl {record['val_ppl']:.2f}  ({count} tokens)")
        return record

    def select(self) -> dict:
        """{"select_loss"} on the selection slice ({} without one); logged, never reported."""
        if not self.select_batches:
            return {}
        self.engine.train(False)
        nll, count = evaluate_nll(self.engine, self.select_batches)
        self.engine.train(True)
        record = {"step": self.step, "select_loss": nll / max(count, 1), "select_tokens": count}
        self.metrics.log(record, prefix="select")
        return {"select_loss": record["select_loss"]}

    LOSS_EMA = 0.9  # smoothing of the training loss for the spike rule (about 10 steps)

    def diverged(self, loss: float) -> bool:
        """The stopping rule of LR sweeps: the training loss is non-finite, or its moving average
        (LOSS_EMA) has risen more than train.divergence_spike nats (default 1) above its own running
        best: a loss spike that a healthy run, whose smoothed loss wanders by a few hundredths of a
        nat, does not show. (A run that never leaves the unigram plateau does not spike; the sweep
        catches it at its pauses by comparing it with a context-free baseline, megatron_lax.sweep.)"""
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

    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        self.resume()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / FINISHED).unlink(missing_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
            self.log(self.describe())
        tokens_per_step, flops_per_tok = self.throughput_basis()
        cluster_peak = introspection.peak_flops(self.dist.device, cfg.logging.peak_flops) * self.dist.world_size
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.dist.is_main and cfg.logging.progress),
                   dynamic_ncols=True, desc="train")
        start, window_start, window_tokens = time.time(), time.time(), 0
        stop = faults.StopFlag(self.dist.device)
        if cfg.logging.lax_stats_every and self.step == 0:
            self.log_latent_stats()  # the initialisation's latent scales, before any update
        self.engine.train(True)
        while self.step < self.total_steps:
            record = self.train_step()
            if self.step in faults.KILL_AT_STEPS:
                faults.kill_self()
            window_tokens += tokens_per_step
            if self.step % cfg.logging.log_every == 0 or self.step == self.total_steps:
                elapsed = time.time() - window_start
                record["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                record["flops_per_s"] = record["tokens_per_s"] * flops_per_tok
                if cluster_peak > 0:
                    record["mfu"] = record["flops_per_s"] / cluster_peak
                record["peak_memory_gb"] = introspection.peak_memory_gb(self.dist.device)
                record.update(introspection.gate_values(self.engine.base_model))
                self.metrics.log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                window_start, window_tokens = time.time(), 0
            bar.update(1)
            if cfg.logging.lax_stats_every and self.step % cfg.logging.lax_stats_every == 0:
                self.log_latent_stats()
            if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                self.validate()
            if self.periodic_checkpoint_due():
                self.save_checkpoint()
            if t.stop_if_diverged and self.diverged(record["loss"]):
                bar.close()
                self.log(f"diverged at step {self.step}: loss {record['loss']:.4f} (smoothed {self.loss_ema:.4f}, its "
                         f"best {self.best_loss_ema:.4f}); stopping (train.stop_if_diverged)")
                self.metrics.log({"step": self.step, "diverged": 1}, prefix="event")
                self.metrics.close()
                return {"diverged": True, "steps": self.step, "loss": record["loss"], "run_dir": str(self.run_dir)}
            if t.stop_after and self.step >= t.stop_after and self.step < self.total_steps:
                bar.close()
                record = self.validate() if self.last_val.get("step") != self.step else self.last_val
                selection = {**self.select(), **(self.selection_baseline() if self.select_batches else {})}
                path = self.checkpoint_this_step()
                self.log(f"paused after step {self.step} of {self.total_steps} (train.stop_after); resume with "
                         f"--checkpoint.resume auto")
                self.metrics.close()
                return {"paused": True, "steps": self.step, **self.summarize(record)[0], **selection,
                        "checkpoint": str(path),
                        "run_dir": str(self.run_dir)}
            if stop.agreed():
                bar.close()
                path = self.checkpoint_this_step()
                self.log(f"preempted by signal {stop.signal}: stopped after step {self.step}, checkpoint {path}")
                self.metrics.close()
                return {"preempted": True, "steps": self.step, "checkpoint": str(path)}
        bar.close()
        final = self.validate()
        selection = {**self.select(), **(self.selection_baseline() if self.select_batches else {})}
        path = self.save_checkpoint()
        fields, headline = self.summarize(final)
        summary = {**fields, "steps": self.step, "tokens": self.tokens, "seconds": time.time() - start,
                   "checkpoint": str(path), "run_dir": str(self.run_dir), **selection}
        baselines = self.baselines() if self.dist.is_main else {}
        if baselines:
            summary.update(baselines)
            self.metrics.log({"step": self.step, **baselines}, prefix="val")
        if self.dist.is_main:
            (self.run_dir / FINISHED).write_text(json.dumps(summary, indent=1))
        shown = ", ".join(f"{k.split('_')[0]} baseline {v:.2f}" for k, v in baselines.items())
        self.log(f"done: {headline}{' (' + shown + ')' if shown else ''}; "
                 f"{self.tokens} {self.unit} in {summary['seconds']:.0f}s; checkpoint {path}; "
                 f"logs {self.run_dir / 'metrics.jsonl'}")
        self.metrics.close()
        return summary


def resolved_for_display(cfg: Config) -> Config:
    """The config with train.steps resolved from the token budget (no data needed for that)."""
    if cfg.model.arch == "llama" and cfg.train.token_budget not in ("0", ""):
        cfg.train.steps = planned_total_steps(cfg)
    return cfg


def trainer_for(cfg: Config):
    """The Trainer of the config's model family (VisionTrainer for a ViT)."""
    if cfg.model.arch == "vit":
        from .vision import VisionTrainer
        return VisionTrainer
    return Trainer


def planned_total_steps(cfg: Config) -> int:
    """The optimizer steps a run will take, before building it (for sweeps' pause points)."""
    if cfg.model.arch == "vit":
        from .vision import planned_steps
        return planned_steps(cfg)
    vocab = cfg.model.vocab_size if cfg.model.vocab_size > 0 else 32000
    model = dataclasses.replace(cfg.model, vocab_size=vocab)
    return data.planned_steps(cfg.train, model, cfg.data.seq_len, count_parameters(model))


def train(cfg: Config, trainer_class=None) -> dict:
    """Runs one training (Trainer, or a subclass such as finetune.FinetuneTrainer) and tears the
    process group down once every rank is done with it."""
    try:
        summary = (trainer_class or trainer_for(cfg))(cfg).fit()
        faults.ignore_preemption_signals()
        barrier()  # no rank tears its process group down while another still uses it
        return summary
    finally:
        shutdown()


def main(argv=None, prog: str = "python -m megatron_lax.train", doc: str = __doc__, trainer_class=None,
         resolve=None, print_summary: bool = False) -> int:
    """The command line of pre-training, and of fine-tuning (megatron_lax.finetune) with its own
    trainer class, config resolution and a JSON summary line at the end."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML (train.steps from the token budget) and exit")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.print_config:
            print(dump_yaml((resolve or resolved_for_display)(cfg)), end="")
            return 0
        summary = train(cfg, trainer_class)
    except (ConfigError, ValueError, FileNotFoundError, checkpoint.CheckpointError, TrainingError,
            data.DataExhausted) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if print_summary and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: summary[k] for k in ("val_loss", "val_ppl", "steps", "checkpoint") if k in summary}))
    return 0


if __name__ == "__main__":
    end_process(main())
