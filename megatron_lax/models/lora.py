"""LoRA adapters on a frozen dense LLaMA, optionally boosted by LaX (the paper's section 5):

    y_i = W_i x_i + (alpha / r) B_i z_i      z_i = A_i dropout(x_i)                        (LoRA)
                                            z_i = LN(A_i dropout(x_i) + G(z_{i-1}))        (LaX-LoRA, block i > 0)

where z_{i-1} is the latent of the same adapter (q->q, ..., down->down) in block i-1. An adapter IS
method.lowrank.LowRankLinear (no activation), so the blocks carry its latent from block to block as they
carry a low-rank model's. B starts at zero: at step 0 a LoRA or LaX-LoRA model computes exactly
the base model's logits, whatever the gate.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from ..method.init import initial_value, name_seed
from ..method.lowrank import DenseLinear, LowRankLinear
from .llama import LlamaLax, init_rules

ATTENTION = ("q", "k", "v", "o")


class LoraLinear(nn.Module):
    """A frozen base projection plus a rank-r adapter; returns (output, the adapter's latent)."""

    def __init__(self, base: DenseLinear, rank: int, alpha: float, dropout: float, gate: Optional[str],
                 norm: bool = True, latent: str = "output"):
        super().__init__()
        self.base = base
        self.adapter = LowRankLinear(base.in_features, base.out_features, rank, activation=None, gate=gate,
                                     latent=latent, norm=norm)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x, prev_latent=None):
        y, _ = self.base(x)
        delta, latent = self.adapter(self.dropout(x), prev_latent)
        return y + self.scale * delta, latent


def projections(model: LlamaLax, names=ATTENTION + ("gate", "up", "down")):
    """(block index, parent module, projection name) for the named projections of every block."""
    for i, block in enumerate(model.layers):
        for name in names:
            yield i, (block.attn if name in ATTENTION else block.mlp), name


def apply_lora(model: LlamaLax, cfg, seed: int = 0, init: bool = True) -> LlamaLax:
    """Freezes the model and wraps every target projection in a LoraLinear, in place. The first
    block's adapters have no gate: there is no previous latent to cross. init=False leaves the
    adapters' values to the caller (a model on the meta device or partitioned by ZeRO-3, which
    then takes adapter_value for each adapter parameter)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for i, parent, name in projections(model, cfg.targets):
        base = getattr(parent, name)
        if not isinstance(base, DenseLinear):
            raise ValueError(f"LoRA needs plain linear projections; block {i} {name} is a {type(base).__name__} "
                             f"(merge the base into dense weights first)")
        if cfg.rank > min(base.in_features, base.out_features):
            raise ValueError(f"lora.rank {cfg.rank} is larger than the {name} projection allows "
                             f"({base.in_features} -> {base.out_features})")
        gate = cfg.lax_gate if cfg.lax_gate != "none" and i > 0 else None
        wrapped = LoraLinear(base, cfg.rank, cfg.alpha, cfg.dropout, gate, cfg.lax_norm, cfg.lax_latent)
        wrapped.adapter.projection = name
        setattr(parent, name, wrapped)
    if init:
        init_adapters(model, seed)
    return model


def kaiming_uniform(shape, fan_in: int, seed: int, name: str) -> torch.Tensor:
    """LoRA's (and nn.Linear's) default for A: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), seeded per name."""
    generator = torch.Generator().manual_seed(name_seed(seed, name))
    return (torch.rand(shape, generator=generator) * 2 - 1) / math.sqrt(fan_in)


@torch.no_grad()
def init_adapters(model: LlamaLax, seed: int) -> None:
    """A kaiming-uniform, B zero, gates at the identity (linear gate 1), LayerNorms at (1, 0); one
    seeded generator per parameter name, so every engine and rank count gets the same adapters."""
    rules = init_rules(model, model.cfg)
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.copy_(adapter_value(name, tuple(p.shape), seed, rules))


def adapter_value(name: str, shape: tuple, seed: int, rules: dict) -> torch.Tensor:
    """The initial fp32 value of one adapter parameter (rules: init_rules of the adapted model)."""
    if name.endswith("adapter.A.weight"):
        return kaiming_uniform(shape, shape[1], seed, name)
    if name.endswith("adapter.B.weight"):
        return torch.zeros(shape)
    return initial_value(*rules[name], shape, seed, name)


def lora_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def uses_lax(model: nn.Module) -> bool:
    return any(m.adapter.lax_gate is not None for m in lora_layers(model))


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state_dict(state: dict) -> dict:
    """The adapter entries (A, B, gates, LayerNorms) of a LoRA model's state dict."""
    return {k: v for k, v in state.items() if ".adapter." in k}


@torch.no_grad()
def merge_lora(model: LlamaLax) -> LlamaLax:
    """Folds plain LoRA adapters into their base weights, W <- W + (alpha / r) B A, and puts the plain
    projections back, in place: the result is an ordinary dense model. LaX-LoRA's adapters depend on
    the previous block's latent, so no single weight matrix holds them: refused."""
    if uses_lax(model):
        raise ValueError("LaX-LoRA adapters read the previous block's latent and cannot be merged into single "
                         "weight matrices; export them in the megatron_lax format instead")
    for _, parent, name in projections(model):
        layer = getattr(parent, name)
        if isinstance(layer, LoraLinear):
            adapter = layer.adapter
            layer.base.weight += layer.scale * (adapter.B.weight.float() @ adapter.A.weight.float()).to(
                layer.base.weight.dtype)
            setattr(parent, name, layer.base)
    return model


def strip_lora(model: LlamaLax) -> LlamaLax:
    """Removes the adapters, in place, leaving the base model."""
    for _, parent, name in projections(model):
        layer = getattr(parent, name)
        if isinstance(layer, LoraLinear):
            setattr(parent, name, layer.base)
    return model
