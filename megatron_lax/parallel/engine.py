"""The trainer's one view of whatever runs the model: forward+backward of a micro-batch, the
optimizer step, and checkpoint state. `LocalEngine` serves a single process and DDP; FSDP2 and
DeepSpeed have their own subclasses. The training loop never branches on the engine."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..config import Config
from . import trust
from .distributed import DistInfo
from .optim import build_optimizer, load_optimizer_state


def materialize(model: nn.Module, initialize: Optional[Callable], device: torch.device,
                dtype: Optional[torch.dtype] = None) -> None:
    """Allocates a meta model's (or its shards') storage on `device` and gives it its values."""
    if initialize is None:
        return
    if dtype is not None:
        model.to(dtype)
    model.to_empty(device=device)
    initialize(model)


@dataclass
class StepResult:
    grad_norm: float | torch.Tensor  # a device tensor where the engine decides on the device (no host read)
    skipped: bool | torch.Tensor  # the gradient was not finite, so no update was applied


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto`: bf16-mixed where the device computes in bf16 natively (CUDA), fp32 elsewhere."""
    if requested != "auto":
        return requested
    return "bf16-mixed" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast_context(precision: str, device: torch.device):
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Engine:
    """Interface. `model` is what to call; `base_model` is the unwrapped model; `loss(outputs,
    targets)` gives (summed loss, scored targets): the task's loss, given to build_engine. With
    `trainable_only` (fine-tuning a frozen base) checkpoints hold the trained parameters only."""

    trainable_only = False

    def saved_state(self) -> dict:
        state = self.base_model.state_dict()
        if not self.trainable_only:
            return state
        trained = {name for name, p in self.base_model.named_parameters() if p.requires_grad}
        return {k: v for k, v in state.items() if k in trained}

    model: nn.Module
    base_model: nn.Module
    optimizer: torch.optim.Optimizer
    uses_autocast = True  # False where the engine casts itself (FSDP2's policy, DeepSpeed's bf16)

    def __init__(self, cfg: Config, dist_info: DistInfo, precision: str, loss):
        self.cfg, self.dist, self.precision, self.loss = cfg, dist_info, precision, loss

    def forward_backward(self, inputs, targets, loss_weight: float, sync: bool):
        """Backpropagates loss_weight * (summed NLL of this micro-batch) so that, over all micro-batches
        of all ranks, the gradient is that of (total NLL / total scored tokens) of the global batch.
        Returns the detached summed NLL and the number of scored tokens."""
        raise NotImplementedError

    def step(self, lr: float) -> StepResult:
        raise NotImplementedError

    def autocast(self):
        if not self.uses_autocast:
            return contextlib.nullcontext()
        return autocast_context(self.precision, self.dist.device)

    @torch.no_grad()
    def eval_nll(self, inputs, targets):
        with self.autocast():
            return self.loss(self.model(inputs), targets)

    @torch.no_grad()
    def predict(self, inputs):
        """The model's outputs (logits) in the training precision; a collective under FSDP2 and
        ZeRO-3, so every rank calls it as often as the others."""
        with self.autocast():
            return self.model(inputs)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def clipped_step(self, parameters) -> StepResult:
        """Clips to optim.grad_clip on the global norm, then steps unless the norm is not finite. The
        fused AdamW skips on the device (its found_inf, as under a GradScaler): nothing is read back
        on the host; another optimizer needs the norm on the host to decide."""
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor under FSDP2
        skipped = ~torch.isfinite(norm)
        if all(group.get("fused") for group in self.optimizer.param_groups):
            self.optimizer.found_inf = skipped.float()
            self.optimizer.step()
        elif not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm.detach(), skipped)

    def train(self, mode: bool = True):
        self.model.train(mode)

    def save(self, directory: Path) -> list[str]:
        """Writes this rank's model and optimizer state into `directory`; returns the file names written."""
        raise NotImplementedError

    def load(self, directory: Path) -> None:
        raise NotImplementedError


class LocalEngine(Engine):
    """A single process, or plain DDP (every rank holds the whole model and optimizer)."""

    def __init__(self, cfg: Config, dist_info: DistInfo, precision: str, loss, model: nn.Module, ddp: bool = False,
                 initialize=None):
        super().__init__(cfg, dist_info, precision, loss)
        materialize(model, initialize, dist_info.device)
        model.to(dist_info.device)
        if precision == "bf16-pure":
            model.to(torch.bfloat16)
        self.base_model = model
        self.optimizer = build_optimizer(model, cfg.optim)
        self.model = model
        if ddp:
            device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        # DDP averages gradients over ranks; the loss is scaled up to turn that into a sum.
        self.rank_scale = dist_info.world_size if ddp else 1

    def forward_backward(self, inputs, targets, loss_weight, sync):
        no_sync = self.model.no_sync if (isinstance(self.model, nn.parallel.DistributedDataParallel) and not sync) \
            else contextlib.nullcontext
        with no_sync():
            with self.autocast():
                nll, count = self.loss(self.model(inputs), targets)
            (nll * (loss_weight * self.rank_scale)).backward()
        return nll.detach(), count

    def step(self, lr):
        self.set_lr(lr)
        return self.clipped_step(self.base_model.parameters())

    def save(self, directory):
        if not self.dist.is_main:
            return []
        torch.save(self.saved_state(), directory / "model.pt")
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
        return ["model.pt", "optimizer.pt"]

    def load(self, directory):
        device = self.dist.device
        self.base_model.load_state_dict(trust.load_tensors(directory / "model.pt", map_location=device),
                                        strict=not self.trainable_only)
        load_optimizer_state(self.optimizer, self.base_model,
                             trust.load_tensors(directory / "optimizer.pt", map_location=device))
