"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch

from ..config import OptimConfig


def decay_split(model: torch.nn.Module, exempt: set[str]) -> tuple[list[str], list[str]]:
    """(names that decay, names that do not) of the trainable parameters, in the model's order."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.dim()  # a ZeRO-3 partition is flat
            (decay if ndim >= 2 and name not in exempt else no_decay).append(name)
    return decay, no_decay


def group_names(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """timm's rule: tensors of two or more dimensions (projections, embeddings, TT cores, gate
    matrices) decay; one-dimensional ones (norms, biases, a scalar gate) do not, nor the parameters
    the model names in its no_weight_decay() (the ViT: position embeddings and CLS token). A model
    without that list exempts every LaX gate (the LLaMA: a gate starts at the identity, and decay
    would pull it toward switching the crossing off rather than toward its start)."""
    from ..method.lowrank import gate_parameter_names
    exempt = model.no_weight_decay() if hasattr(model, "no_weight_decay") else gate_parameter_names(model)
    return decay_split(model, exempt)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    params = dict(model.named_parameters())
    decay, no_decay = group_names(model)
    return [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
            {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module, state: dict) -> None:
    """optimizer.load_state_dict, also for a state saved when every LaX gate was exempt from decay
    whatever the model (before models named their own exemptions): its parameters are regrouped by name."""
    saved = [len(g["params"]) for g in state["param_groups"]]
    if saved != [len(g["params"]) for g in optimizer.param_groups]:
        from ..method.lowrank import gate_parameter_names
        before = decay_split(model, gate_parameter_names(model))
        if [len(g) for g in before] != saved:
            raise ValueError(f"the optimizer state holds parameter groups of {saved} tensors, which fit neither this "
                             f"model's weight-decay groups nor those of earlier versions")
        state = regrouped(state, before, group_names(model), optimizer.state_dict()["param_groups"])
    optimizer.load_state_dict(state)


def regrouped(state: dict, before: tuple[list[str], ...], now: tuple[list[str], ...], groups: list[dict]) -> dict:
    index_of = {name: i for group, saved in zip(before, state["param_groups"]) for name, i in zip(group, saved["params"])}
    order = [name for group in now for name in group]
    new_index = {name: k for k, name in enumerate(order)}
    per_param = {new_index[name]: state["state"][index_of[name]] for name in order if index_of[name] in state["state"]}
    firsts = [sum(len(g) for g in now[:j]) for j in range(len(now))]
    param_groups = [{**group, "params": list(range(first, first + len(names)))}
                    for group, first, names in zip(groups, firsts, now)]
    return {"state": per_param, "param_groups": param_groups}


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
