"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch

from ..config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """timm's rule: tensors of two or more dimensions (projections, embeddings, TT cores, gate
    matrices) decay; one-dimensional ones (norms, biases, a scalar gate) do not, nor the parameters
    the model names in its no_weight_decay() (the ViT: position embeddings and CLS token). A model
    without that list exempts every LaX gate (the LLaMA: a gate starts at the identity, and decay
    would pull it toward switching the crossing off rather than toward its start)."""
    from ..method.lowrank import gate_parameter_names
    exempt = model.no_weight_decay() if hasattr(model, "no_weight_decay") else gate_parameter_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.dim()  # a ZeRO-3 partition is flat
            (decay if ndim >= 2 and name not in exempt else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The fused AdamW kernel (CPU and CUDA) is several times faster than the default per-tensor loop."""
    devices = {p.device.type for p in model.parameters()}
    fused = devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps >= 0 else int(cfg.warmup_ratio * total_steps)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from 0 to the peak, then a
    cosine decay to min_lr_ratio * peak at the last step."""
    warmup = warmup_steps(cfg, total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup - 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)
