"""The DeepSpeed engine (ZeRO stage 1-3). Its JSON config is generated from ours (batch geometry,
gradient clipping, AdamW, bf16, ZeRO stage) unless the user gives their own
(parallel.deepspeed_config); either way the trainer sets the learning rate of every step, so no
DeepSpeed scheduler runs. The JSON actually used is written to RUN_DIR/deepspeed_config.json."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import torch

from . import trust
from .optim import param_groups
from .distributed import run_on_main
from .engine import Engine, StepResult, materialize

TAG = "deepspeed"
PICKLED = "is a DeepSpeed checkpoint, whose files are pickled Python objects"


def bf16_section(precision: str) -> dict:
    """bf16-mixed: bf16 compute, fp32 master weights and optimizer state (DeepSpeed's default);
    bf16-pure: weights, gradients and optimizer state all in bf16."""
    if precision == "bf16-pure":
        return {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
    return {"enabled": precision == "bf16-mixed"}


def generated_config(cfg, precision: str) -> dict:
    o = cfg.optim
    return {
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": bf16_section(precision),
        # torch's fused AdamW (CPU and CUDA) instead of DeepSpeed's, which is compiled on first use;
        # the per-group weight decay of optim.param_groups overrides the default here.
        "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps,
                                                  "weight_decay": o.weight_decay, "torch_adam": True,
                                                  "fused": True}},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def user_config(path: str) -> dict:
    try:
        user = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"parallel.deepspeed_config {path}: {e}") from None
    if not isinstance(user, dict):
        raise ValueError(f"parallel.deepspeed_config {path}: expected a JSON object")
    user.pop("scheduler", None)  # the trainer's warmup + cosine schedule sets every step's LR
    return user


def deepspeed_config(cfg, world_size: int, precision: str) -> dict:
    """The user's JSON or the generated one, with our batch geometry (DeepSpeed checks
    train_batch_size = micro batch x accumulation x ranks)."""
    t = cfg.train
    ds = user_config(cfg.parallel.deepspeed_config) if cfg.parallel.deepspeed_config \
        else generated_config(cfg, precision)
    ds.setdefault("optimizer", generated_config(cfg, precision)["optimizer"])
    ds.update(train_batch_size=t.global_batch, train_micro_batch_size_per_gpu=t.micro_batch,
              gradient_accumulation_steps=t.global_batch // (t.micro_batch * world_size))
    if ds.get("zero_optimization", {}).get("stage", 0) not in (1, 2, 3):
        # Stage 0 would apply a non-finite gradient instead of skipping the step, and keeps no bf16
        # optimizer state; it shards nothing, which is what parallel.engine ddp does.
        raise ValueError("parallel.engine deepspeed needs ZeRO stage 1, 2 or 3; use parallel.engine ddp "
                         "for unsharded data parallelism")
    return ds


class DeepSpeedEngine(Engine):
    uses_autocast = False  # DeepSpeed's bf16 mode casts the model itself

    def __init__(self, cfg, dist_info, precision, loss, model, initialize=None):
        """With `initialize`, the model comes partitioned from zero.Init (stage 3) or on the meta device."""
        import deepspeed

        super().__init__(cfg, dist_info, precision, loss)
        if initialize is not None and cfg.parallel.zero_stage == 3:
            initialize(model)
        else:
            materialize(model, initialize, dist_info.device)
        self.base_model = model
        self.accumulation = cfg.train.global_batch // (cfg.train.micro_batch * dist_info.world_size)
        self.ds_config = deepspeed_config(cfg, dist_info.world_size, precision)
        if dist_info.is_main:
            run_dir = Path(cfg.logging.run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=1))
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=self.ds_config)
        if not hasattr(self.optimizer, "has_overflow"):  # DeepSpeed's BF16_Optimizer: stage 1, fp32 grad_accum_dtype
            raise ValueError(f"this DeepSpeed configuration uses {type(self.optimizer).__name__}, which cannot skip "
                             f"a step with non-finite gradients; use ZeRO stage 2/3 or drop data_types.grad_accum_dtype")

    def forward_backward(self, inputs, targets, loss_weight, sync):
        nll, count = self.loss(self.model(inputs), targets)
        # DeepSpeed divides by the accumulation steps and averages over ranks; undo both.
        self.model.backward(nll * (loss_weight * self.accumulation * self.dist.world_size))
        if not sync:
            with torch.no_grad():
                self.model.step()  # not an accumulation boundary: DeepSpeed only counts the micro-step
        return nll.detach(), count

    def step(self, lr):
        self.set_lr(lr)
        with torch.no_grad():  # gloo's all-gather fallback writes into split views
            # ZeRO looks for inf/NaN in the reduced gradients only under fp16 loss scaling (stage 3)
            # or when configured (stages 1-2, bf16). Ask it on every stage and precision: with
            # `overflow` set, it clears the gradients and skips the update.
            self.optimizer.overflow = self.optimizer.has_overflow()
            self.model.step()  # the boundary: clip to gradient_clipping, update
        if not self.model.was_step_applied():
            return StepResult(float("nan"), skipped=True)
        return StepResult(float(self.model.get_global_grad_norm()), skipped=False)

    def save(self, directory):
        # DeepSpeed's save ends in collectives (a barrier, ZeRO-3's re-gather), so a write that fails
        # on one rank must not skip them or the other ranks would wait there forever: the failure is
        # kept and raised once DeepSpeed returns, for the checkpoint code to agree on.
        failures, writer = [], self.model.checkpoint_engine
        write = writer.save

        def save_or_remember(*args, **kwargs):
            try:
                write(*args, **kwargs)
            except OSError as e:
                failures.append(e)

        writer.save = save_or_remember
        try:
            self.model.save_checkpoint(str(directory), tag=TAG, exclude_frozen_parameters=self.trainable_only)
        finally:
            del writer.save  # the instance attribute; the class's method shows through again
        if failures:
            raise failures[0]
        return [TAG]

    def load(self, directory):
        """Loads DeepSpeed's own files when they were written by as many ranks as this run has;
        otherwise converts them once into a universal checkpoint beside them (DeepSpeed's
        ds_to_universal, on rank 0) and loads that, which reshards model and optimizer state.
        DeepSpeed unpickles its files: they are read from a trusted place only (megatron_lax.trust)."""
        trust.require(Path(directory) / TAG, PICKLED)
        tag = TAG if saved_world_size(directory) == self.dist.world_size else universal_checkpoint(directory,
                                                                                                  self.dist)
        groups = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.model._config.load_universal_checkpoint = tag == UNIVERSAL  # read at load time only
        try:
            path, _ = self.model.load_checkpoint(str(directory), tag=tag, load_module_strict=not self.trainable_only,
                                                 load_optimizer_states=True, load_lr_scheduler_states=False)
        finally:
            self.model._config.load_universal_checkpoint = False
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint")
        if tag == UNIVERSAL:
            repair_universal_load(self.optimizer, groups)


UNIVERSAL = "deepspeed_universal"


def saved_world_size(directory: Path) -> int:
    """The number of data-parallel ranks that wrote a DeepSpeed checkpoint (one optimizer file each)."""
    return len(list((Path(directory) / TAG).glob("*zero_pp_rank_*_optim_states.pt")))


def universal_checkpoint(directory: Path, dist_info) -> str:
    """Converts directory/deepspeed into directory/deepspeed_universal unless that exists; returns its
    tag. Rank 0 converts while the others wait as long as it takes (run_on_main: a gloo group with a
    long timeout; a 7B model's conversion outlasts NCCL's 10 minutes)."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    target = Path(directory) / UNIVERSAL

    def convert() -> None:
        if target.is_dir():
            return
        staging = target.with_name(UNIVERSAL + ".incomplete")
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.redirect_stdout(io.StringIO()):
            ds_to_universal(argparse.Namespace(
                input_folder=str(Path(directory) / TAG), output_folder=str(staging), num_extract_workers=1,
                num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
        os.replace(staging, target)

    try:
        run_on_main(convert)
    except Exception as e:  # noqa: BLE001 - every rank reports it in one line
        raise ValueError(f"{directory} was written by {saved_world_size(directory)} ranks and could not be converted "
                         f"for {dist_info.world_size} ({type(e).__name__}: {e}); convert it with `python -m "
                         f"deepspeed.checkpoint.ds_to_universal --inject_missing_state --input_folder "
                         f"{Path(directory) / TAG} --output_folder {target}`") from None
    return UNIVERSAL


def repair_universal_load(optimizer, groups: list[dict]) -> None:
    """Undoes two slips of DeepSpeed's universal loading (0.19): it copies the hyperparameters of
    the first parameter group onto every group (weight decay lands on norms and gates), and gives
    every group the same step-count tensor, which fused AdamW then advances once per group."""
    for group, saved in zip(optimizer.param_groups, groups):
        group.update(saved)
    for state in optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def consolidate(directory) -> dict:
    """The full fp32 model state dict of a DeepSpeed checkpoint of any ZeRO stage, on one process."""
    trust.require(Path(directory) / TAG, PICKLED)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG)
