"""The DeepSpeed engine (ZeRO stage 0-3). Its JSON config is generated from ours unless the user
gives their own (parallel.deepspeed_config); our AdamW is handed to DeepSpeed as the client
optimizer, and the trainer sets the learning rate every step."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..model import token_nll
from ..optim import build_optimizer
from .engine import Engine, StepResult

TAG = "deepspeed"


def deepspeed_config(cfg, world_size: int, precision: str) -> dict:
    t = cfg.train
    accumulation = t.global_batch // (t.micro_batch * world_size)
    if cfg.parallel.deepspeed_config:
        path = Path(cfg.parallel.deepspeed_config)
        try:
            user = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"parallel.deepspeed_config {path}: {e}") from None
        # The batch geometry must agree with ours, whatever else the user's file says.
        user.update(train_micro_batch_size_per_gpu=t.micro_batch, gradient_accumulation_steps=accumulation,
                    train_batch_size=t.global_batch)
        user.pop("optimizer", None), user.pop("scheduler", None)
        return user
    return {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": precision == "bf16-mixed"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine(Engine):
    uses_autocast = False  # DeepSpeed's bf16 mode casts the model itself

    def __init__(self, cfg, dist_info, precision, model):
        import deepspeed

        super().__init__(cfg, dist_info, precision)
        if precision == "bf16-pure":
            model.to(torch.bfloat16)
        self.base_model = model
        self.accumulation = cfg.train.global_batch // (cfg.train.micro_batch * dist_info.world_size)
        self.ds_config = deepspeed_config(cfg, dist_info.world_size, precision)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=build_optimizer(model, cfg.optim), config=self.ds_config)

    def forward_backward(self, inputs, targets, loss_weight, sync):
        nll, count = token_nll(self.model(inputs), targets)
        # DeepSpeed divides by the accumulation steps and averages over ranks; undo both.
        self.model.backward(nll * (loss_weight * self.accumulation * self.dist.world_size))
        if not sync:
            with torch.no_grad():
                self.model.step()  # not an accumulation boundary: DeepSpeed only counts the micro-step
        return nll.detach(), count

    def step(self, lr):
        self.set_lr(lr)
        with torch.no_grad():  # gloo's all-gather fallback writes into split views
            self.model.step()  # the boundary: reduce, clip to gradient_clipping, update
        norm = self.model.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
        return StepResult(grad_norm, skipped=not math.isfinite(grad_norm))

    def save(self, directory):
        self.model.save_checkpoint(str(directory), tag=TAG)
        return [TAG]

    def load(self, directory):
        path, _ = self.model.load_checkpoint(str(directory), tag=TAG, load_module_strict=True,
                                             load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint")


def consolidate(directory) -> dict:
    """The full fp32 model state dict of a DeepSpeed checkpoint of any ZeRO stage, on one process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG)
