"""Engines (single, DDP, FSDP2, DeepSpeed) and the functions that apply activation checkpointing
and compilation to an unmodified model."""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..config import Config
from .distributed import DistInfo
from .engine import Engine, LocalEngine, StepResult, resolve_precision


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass. The block's forward is wrapped in
    place, so parameter names (and checkpoints) are unchanged; LaX latents are ordinary inputs and
    outputs of the checkpointed function, so they cross block boundaries as usual."""
    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block's forward in place (parameter names unchanged; blocks of the same
    shape share the compiled code). Apply it before activation checkpointing, which then recomputes
    the compiled forward: compiling a checkpointed forward silently compiles nothing."""
    for block in model.layers:
        block.forward = torch.compile(block.forward)


def build_engine(cfg: Config, model: nn.Module, dist_info: DistInfo) -> Engine:
    precision = resolve_precision(cfg.train.precision, dist_info.device)
    if cfg.train.compile:
        apply_compile(model)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    engine = cfg.parallel.engine
    if engine in ("single", "ddp"):
        return LocalEngine(cfg, dist_info, precision, model, ddp=engine == "ddp")
    if engine == "fsdp":
        from .fsdp import FSDPEngine
        return FSDPEngine(cfg, dist_info, precision, model)
    from .deepspeed_engine import DeepSpeedEngine
    return DeepSpeedEngine(cfg, dist_info, precision, model)


def checkpoint_engine(checkpoint_dir: Path) -> str:
    """Which engine wrote a checkpoint, from the files it holds: `fsdp`, `deepspeed` or `local`."""
    from .deepspeed_engine import TAG
    from .fsdp import DCP_DIR
    if (checkpoint_dir / DCP_DIR).is_dir():
        return "fsdp"
    if (checkpoint_dir / TAG).is_dir():
        return "deepspeed"
    if (checkpoint_dir / "model.pt").is_file():
        return "local"
    raise FileNotFoundError(f"{checkpoint_dir}: no model state from any engine (model.pt, dcp/ or deepspeed/)")


def consolidated_state_dict(checkpoint_dir: Path, cfg: Config | str | None = None) -> dict:
    """The full model state dict (fp32 master weights where the engine keeps them) of a checkpoint
    written by any engine, loaded on one process without a process group. The engine is read from
    the checkpoint's files; `cfg` (a Config or an engine name) is accepted for callers that have it."""
    checkpoint_dir = Path(checkpoint_dir)
    engine = checkpoint_engine(checkpoint_dir)
    if engine == "fsdp":
        from .fsdp import consolidate
        return consolidate(checkpoint_dir)
    if engine == "deepspeed":
        from .deepspeed_engine import consolidate
        return consolidate(checkpoint_dir)
    return torch.load(checkpoint_dir / "model.pt", map_location="cpu", weights_only=True)


__all__ = ["Engine", "StepResult", "build_engine", "checkpoint_engine", "consolidated_state_dict", "apply_activation_checkpointing",
           "apply_compile"]
