"""What the training loop asks of a task (training/trainer.py never asks anything else).

A task is built once per run, before the model: `Task(cfg, dist)` opens its data, completes its own
copy of the config from it (`self.cfg`: a vocabulary from the tokenizer, classes from the images,
warmup from epochs) and sets `loader` (this rank's micro-batches, resumable: state_dict /
load_state_dict) and `total_steps`. Then, in this order, the trainer calls `model()` and builds the
engine with `loss`, calls `attach(engine)`, and takes the validation batches. Everything after that
(a step, validation, summaries) only reads.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..config import Config
from ..parallel.distributed import DistInfo, all_reduce_sum
from ..parallel.optim import lr_at


class Task:
    unit = "tokens"  # what the loss scores, and what the trainer counts: tokens, images
    keep_best = False  # write RUN/best at each new lowest validation loss
    # (summary key, column title, higher is better): how experiments rank finished runs
    headline_metric = ("val_loss", "val loss", False)
    # the summary fields a reproduction plan may report (its `metric`): key -> (title, higher is better)
    metric_titles = {"val_loss": ("val loss", False)}
    # (key, title) of the reference number baselines() logs beside the final validation; ("", "") if none
    baseline_metric = ("", "")

    def __init__(self, cfg: Config, dist: DistInfo):
        self.cfg, self.dist = copy.deepcopy(cfg), dist
        self.loader = None
        self.total_steps = 0
        self.n_params: int | None = None

    # --- building ----------------------------------------------------------------------------------

    def model(self):
        """A parallel.ModelRecipe (built on the meta device or partitioned by the engine) or a module."""
        raise NotImplementedError

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, number of scored targets) of one micro-batch."""
        raise NotImplementedError

    def attach(self, engine) -> None:
        """Called once the engine holds the model."""

    def check_resume(self, checkpoint_dir: Path) -> None:
        """Refuses (CheckpointError) a checkpoint the task cannot continue from, beyond the model's shape."""

    # --- data --------------------------------------------------------------------------------------

    def validation_batches(self) -> list:
        """This rank's validation micro-batches; every rank gets as many (sharded engines meet in each)."""
        raise NotImplementedError

    def selection_batches(self) -> list:
        """A slice held out for choices (LR sweeps), never reported; [] when the task has none."""
        return []

    def scored(self, targets) -> int:
        """How many targets of a micro-batch (as the loader gave it) the loss scores."""
        return len(targets)

    def to_device(self, inputs, targets) -> tuple[torch.Tensor, torch.Tensor]:
        """A training micro-batch as the loader gave it -> (inputs, targets) on the training device, where
        a task may also transform it (image classification: normalisation and mixing)."""
        device = self.dist.device
        return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)

    def learning_rate(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.cfg.optim)

    # --- scoring -----------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate_loss(self, engine, batches) -> tuple[float, int]:
        """Summed loss and scored-target count over this rank's batches, summed over all ranks."""
        totals = torch.zeros(2, dtype=torch.float64, device=engine.dist.device)
        for x, y in batches:
            loss, count = engine.eval_nll(x, y)
            totals[0] += loss.double()
            totals[1] += count
        all_reduce_sum(totals)
        return float(totals[0]), int(totals[1])

    def evaluate(self, engine, batches, seen: int = 0) -> dict:
        """The validation metrics ({"val_loss", ...}) over every rank's batches, after `seen` units of training."""
        raise NotImplementedError

    def describe_validation(self, record: dict) -> str:
        return f"val_loss {record['val_loss']:.4f}"

    def summarize(self, final: dict, best_val_loss: float) -> tuple[dict, str]:
        """The end-of-run summary's validation fields and how they read in the last line."""
        raise NotImplementedError

    def selection_baseline(self) -> dict:
        """{"select_chance_loss": a context-free model's loss on the selection slice} or {}."""
        return {}

    def baselines(self) -> dict:
        """Reference numbers logged beside the final validation (main rank only)."""
        return {}

    def describe(self, engine) -> str:
        raise NotImplementedError

    def throughput_basis(self) -> tuple[float | None, float]:
        """(units per optimizer step, training FLOPs per unit) for throughput and MFU; None units per
        step: the units the loss scored, counted as they come."""
        raise NotImplementedError

    # --- a saved model (python -m megatron_lax.evaluate) -------------------------------------------------

    @classmethod
    def evaluate_checkpoint(cls, model, cfg: Config, dist: DistInfo, data_path: str | None = None, count: int = 0,
                            micro_batch: int = 0) -> dict:
        """The validation metrics of a loaded model (any engine's checkpoint, or an export) on its run's
        validation data, or on `data_path`; `count`: how many units (0: the run's). Every rank calls it."""
        raise NotImplementedError

    @classmethod
    def describe_evaluation(cls, result: dict) -> str:
        """The line evaluate prints for evaluate_checkpoint's result (which also holds "precision"), before
        the checkpoint and step."""
        raise NotImplementedError

    @classmethod
    def display_config(cls, cfg: Config) -> Config:
        """The config as --print-config shows it."""
        return cfg

    @classmethod
    def planned_steps(cls, cfg: Config) -> int:
        """The optimizer steps a run of this config will take, known before it is built."""
        return cfg.train.steps
