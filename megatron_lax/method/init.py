"""Initial values that do not depend on how a model is built or sharded.

A model states its initialisation as rules, {parameter name: (kind, std)} with kinds `normal` (that
std), `uniform` (on [-std, std]), `ones`, `zeros` and `eye` (a rectangular identity): a family model's `weight_init_rules()` covers its own
layers and asks each low-rank module for its rules through `module_init_rules`. `init_weights` then
draws every parameter from its own generator, seeded by (seed, parameter name), so a model has the
same weights whether it is built whole, on the meta device and sharded by FSDP2, or partitioned by
DeepSpeed ZeRO-3.
"""
from __future__ import annotations

import hashlib
import inspect
from typing import Callable

import torch
import torch.nn as nn

Rules = dict[str, tuple[str, float]]


def module_init_rules(module: nn.Module, at: str, init: str, init_std: float) -> Rules:
    """The rules of one module of the method (a format or a gate) whose names start with `at`; {} for
    a module that states none. `init` is model.lowrank_init resolved (cola | matched)."""
    own = getattr(module, "init_rules", None)
    return own(at, init, init_std) if own is not None else {}


def name_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def initial_value(kind: str, std: float, shape, seed: int, name: str) -> torch.Tensor:
    """The full fp32 CPU value of one parameter, the same on every process (`uniform`: on [-std, std])."""
    if kind == "normal":
        return torch.randn(shape, generator=torch.Generator().manual_seed(name_seed(seed, name))).mul_(std)
    if kind == "uniform":
        return torch.rand(shape, generator=torch.Generator().manual_seed(name_seed(seed, name))).mul_(2 * std).sub_(std)
    if kind == "eye":
        return torch.eye(shape[0], shape[-1])  # rectangular for shape-changing tensor gates
    return torch.ones(shape) if kind == "ones" else torch.zeros(shape)


@torch.no_grad()
def assign_parameters(model: nn.Module, value_of: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    """Sets every parameter to value_of(name, param), a full-size CPU tensor, whether the parameter is
    a plain tensor, an FSDP2 shard (DTensor: each rank keeps its own slice, no communication) or a
    DeepSpeed ZeRO-3 partition (gathered one parameter at a time)."""
    for name, p in model.named_parameters():
        full = value_of(name, p)
        if hasattr(p, "device_mesh"):  # DTensor
            from torch.distributed.tensor import distribute_tensor
            # src_data_rank=None (torch >= 2.7): every rank holds the full value, so no rank sends it
            own = {"src_data_rank": None} if "src_data_rank" in inspect.signature(distribute_tensor).parameters else {}
            local = distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements, **own)
            p.to_local().copy_(local.to_local())
        elif hasattr(p, "ds_id"):  # DeepSpeed ZeRO-3
            import deepspeed
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.copy_(full.to(p.device, p.dtype))
        else:
            p.copy_(full.to(p.device, p.dtype))


def init_weights(model: nn.Module, seed: int) -> None:
    """Gives every parameter of a model (any family: it must define `weight_init_rules()`) its initial value."""
    rules = model.weight_init_rules()
    missing = [name for name, _ in model.named_parameters() if name not in rules]
    if missing:
        raise RuntimeError(f"no initialisation rule for {missing[:3]}")
    shape_of = lambda p: tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
    assign_parameters(model, lambda name, p: initial_value(*rules[name], shape_of(p), seed, name))
