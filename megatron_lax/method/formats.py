"""The registry of linear formats. `make_linear` builds, and `projection_counts` counts, any
projection of any model family by `model.method`.

A format is an object (a `base.Format` subclass, one file each) that owns everything about itself: the
model.* fields it adds (a small dataclass, merged into ModelConfig by megatron_lax/config.py, so YAML,
`--model.x`, --help and --print-config see them), their validation, its label in tables, its default
initialisation, how it builds a projection, its parameter and FLOP counts, what it keeps for backward
(the memory plan), and whether it merges into one dense weight. A new format is its file plus one line
in FORMATS below; nothing else names it.
"""
from __future__ import annotations


import torch.nn as nn

from .base import Format
from .cola import CoLA
from .dense import Dense
from .lowrank import crossing_flops, crossing_parameters
from .svd import SVD
from .tensor_train import TensorTrain


def register(fmt: Format) -> Format:
    """Adds a format to the registry (a test or a user's own module can register one at run time)."""
    FORMATS[fmt.name] = fmt
    return fmt


FORMATS: dict[str, Format] = {fmt.name: fmt for fmt in (
    Dense(),
    SVD(),
    CoLA(),
    TensorTrain(),
)}


def format_of(cfg) -> Format:
    if cfg.method not in FORMATS:
        raise ValueError(f"model.method {cfg.method!r} is not a registered format ({', '.join(FORMATS)})")
    return FORMATS[cfg.method]


def make_linear(cfg, projection: str, d_in: int, d_out: int, layer: int, bias: bool = False,
                activation: str = "silu") -> nn.Module:
    """The one factory for every projection of every block of every model family. `cfg` is a
    ModelConfig; `activation` is the family's own (SiLU for LLaMA, GELU for the ViT), which a format
    with a latent activation (CoLA) puts on its latent."""
    crossing = dict(gate=cfg.lax_gate if cfg.crosses(projection, layer) else None, gate_init=cfg.lax_gate_init,
                    latent=cfg.lax_latent, norm=cfg.lax_norm)
    module = format_of(cfg).build(cfg, projection, d_in, d_out, bias, activation, crossing)
    module.projection = projection
    if hasattr(module, "hands_on"):
        module.hands_on = cfg.crosses(projection, layer + 1)
    return module


def projection_counts(cfg, projection: str, d_in: int, d_out: int, layer: int, bias: bool = False) -> tuple[int, int]:
    """(parameters, forward FLOPs per token) of the projection make_linear builds, its crossing and
    intra-layer gates included (2 FLOPs per multiply-add; elementwise activations left out)."""
    params, flops, latent_width = format_of(cfg).count(cfg, projection, d_in, d_out)
    if cfg.crosses(projection, layer):
        params += crossing_parameters(cfg.lax_gate, latent_width, cfg.lax_gate_init, cfg.lax_norm)
        flops += crossing_flops(cfg.lax_gate, latent_width)
    return params + (d_out if bias else 0), flops


def projection_saved_bytes(cfg, projection: str, d_in: int, d_out: int, layer: int, mode: str,
                           act_bytes: int) -> int:
    """Bytes per token the projection make_linear builds keeps for backward beyond its input, under
    train.activation_checkpointing `mode` (none, block, lowrank), with activations of act_bytes bytes."""
    return format_of(cfg).saved_bytes(cfg, projection, d_in, d_out, layer, mode, act_bytes)
