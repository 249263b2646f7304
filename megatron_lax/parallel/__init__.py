"""Engines (single, DDP, FSDP2, DeepSpeed) and the functions that apply activation checkpointing
and compilation to an unmodified model.

An engine is given either a built model or a `ModelRecipe`. From a recipe no rank ever holds the whole
model: it is constructed on the meta device (or inside DeepSpeed's zero.Init for ZeRO-3), sharded,
allocated shard by shard, and only then given its values."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import torch
import torch.nn as nn

from . import trust
from ..config import Config
from .distributed import DistInfo
from .engine import Engine, LocalEngine, StepResult, materialize, resolve_precision
from .recompute import apply_activation_checkpointing


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block's forward in place, whole (fullgraph: a graph break is an error), with
    parameter names unchanged; blocks of the same shape share the compiled code. Per block rather
    than the whole model, so that FSDP2's per-block hooks stay outside the graphs. Apply it before
    activation checkpointing, which then recomputes the compiled forward: compiling a checkpointed
    forward silently compiles nothing."""
    for block in model.layers:
        block.forward = torch.compile(block.forward, fullgraph=True)


@dataclass
class ModelRecipe:
    """build(): the model's modules, called on the meta device or inside zero.Init, so values do not
    matter; initialize(model): fills every parameter in place, whether a plain tensor, an FSDP2 shard
    or a ZeRO-3 partition (see model.assign_parameters)."""
    build: Callable[[], nn.Module]
    initialize: Callable[[nn.Module], None]


def construct(source: Union[nn.Module, ModelRecipe], cfg: Config, precision: str, world_size: int):
    """(model, initialize or None). A recipe is built on the meta device, or for ZeRO-3 inside
    deepspeed.zero.Init, which partitions each module's parameters as soon as it is built."""
    if isinstance(source, nn.Module):
        return source, None
    if cfg.parallel.engine == "deepspeed" and cfg.parallel.zero_stage == 3:
        import deepspeed
        from .deepspeed_engine import deepspeed_config
        deepspeed.init_distributed()  # joins the existing process group
        with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, world_size, precision)):
            return source.build(), source.initialize
    with torch.device("meta"):
        return source.build(), source.initialize


def build_engine(cfg: Config, source: Union[nn.Module, ModelRecipe], dist_info: DistInfo, loss) -> Engine:
    """The engine cfg.parallel names, running `source` with `loss(outputs, targets)` -> (summed loss,
    scored targets), the task's."""
    precision = resolve_precision(cfg.train.precision, dist_info.device)
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
    model, initialize = construct(source, cfg, precision, dist_info.world_size)
    if cfg.train.compile:
        apply_compile(model)
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    engine = cfg.parallel.engine
    if engine in ("single", "ddp"):
        return LocalEngine(cfg, dist_info, precision, loss, model, ddp=engine == "ddp", initialize=initialize)
    if engine == "fsdp":
        from .fsdp import FSDPEngine
        return FSDPEngine(cfg, dist_info, precision, loss, model, initialize)
    from .deepspeed_engine import DeepSpeedEngine
    return DeepSpeedEngine(cfg, dist_info, precision, loss, model, initialize)


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
    return trust.load_tensors(checkpoint_dir / "model.pt")


__all__ = ["Engine", "ModelRecipe", "StepResult", "build_engine", "materialize", "checkpoint_engine", "consolidated_state_dict", "apply_activation_checkpointing",
           "apply_compile"]
