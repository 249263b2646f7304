"""The registry of linear formats: `make_linear` builds, and `projection_counts` counts, any
projection of any model family by `model.method`.

A format is a pair of functions:

    build(cfg, projection, d_in, d_out, layer, bias, activation, tt_dims, crossing) -> nn.Module
    count(cfg, projection, d_in, d_out, tt_dims) -> (parameters, forward FLOPs per token, latent width)

`crossing` holds the LaX keyword arguments of LatentLinear (gate, gate_init, latent, norm); the
counts leave the crossing and the bias out (projection_counts adds them). A new format is one file
defining the pair and one line in FORMATS.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch.nn as nn

from . import lowrank, tensor_train
from .lowrank import crossing_flops, crossing_parameters


class Format(NamedTuple):
    build: Callable[..., nn.Module]
    count: Callable[..., tuple[int, int, int]]
    saved_bytes: Callable[..., int]  # (cfg, projection, d_in, d_out, tt_dims, layer, mode, act bytes) -> per token


FORMATS: dict[str, Format] = {
    "dense": Format(lowrank.build_dense, lowrank.count_dense, lowrank.saved_bytes_dense),
    "svd": Format(lowrank.build_factored, lowrank.count_factored, lowrank.saved_bytes_factored),
    "cola": Format(lowrank.build_factored, lowrank.count_factored, lowrank.saved_bytes_factored),
    "tt": Format(tensor_train.build_tt, tensor_train.count_tt, tensor_train.saved_bytes_tt),
}


def format_of(cfg) -> Format:
    if cfg.method not in FORMATS:
        raise ValueError(f"model.method {cfg.method!r} is not a registered format ({', '.join(FORMATS)})")
    return FORMATS[cfg.method]


def make_linear(cfg, projection: str, d_in: int, d_out: int, layer: int, bias: bool = False,
                activation: str = "silu", tt_dims: Optional[tuple[list, list]] = None) -> nn.Module:
    """The one factory for every projection of every block of every model family. `cfg` is a
    ModelConfig; `activation` is CoLA's latent activation (the family's own: SiLU for LLaMA, GELU
    for the ViT); `tt_dims` the (input, output) modes of a tensor-train projection."""
    crossing = dict(gate=cfg.lax_gate if cfg.crosses(projection, layer) else None, gate_init=cfg.lax_gate_init,
                    latent=cfg.lax_latent, norm=cfg.lax_norm)
    module = format_of(cfg).build(cfg, projection, d_in, d_out, layer, bias, activation, tt_dims, crossing)
    if hasattr(module, "hands_on"):
        module.hands_on = cfg.crosses(projection, layer + 1)
    return module


def projection_counts(cfg, projection: str, d_in: int, d_out: int, layer: int, bias: bool = False,
                      tt_dims: Optional[tuple[list, list]] = None) -> tuple[int, int]:
    """(parameters, forward FLOPs per token) of the projection make_linear builds, its crossing and
    intra-layer gates included (2 FLOPs per multiply-add; elementwise activations left out)."""
    params, flops, latent_width = format_of(cfg).count(cfg, projection, d_in, d_out, tt_dims)
    if cfg.crosses(projection, layer):
        params += crossing_parameters(cfg.lax_gate, latent_width, cfg.lax_gate_init, cfg.lax_norm)
        flops += crossing_flops(cfg.lax_gate, latent_width)
    return params + (d_out if bias else 0), flops


def projection_saved_bytes(cfg, projection: str, d_in: int, d_out: int, layer: int, mode: str, act_bytes: int,
                           tt_dims: Optional[tuple[list, list]] = None) -> int:
    """Bytes per token the projection make_linear builds keeps for backward beyond its input, under
    train.activation_checkpointing `mode` (none, block, lowrank), with activations of act_bytes bytes."""
    return format_of(cfg).saved_bytes(cfg, projection, d_in, d_out, tt_dims, layer, mode, act_bytes)
