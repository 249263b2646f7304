"""Model families, built from the method package (megatron_lax.method):

    base.py    what a family is (`Family`: fields, validation, build, loss, counts, task)
    llama.py   the LLaMA decoder (language modelling) and its family object
    vit.py     the Vision Transformer (image classification) and its family object
    lora.py    LoRA / LaX-LoRA adapters on a LLaMA

`FAMILIES` is the one place that maps `model.arch` to a family; nothing else compares `arch`. A new
family is its file plus one line here.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from .base import Family, memory_gb
from .llama import Llama
from .vit import ViT


def register(family: Family) -> Family:
    """Adds a family to the registry (a test or a user's own module can register one at run time)."""
    FAMILIES[family.name] = family
    return family


FAMILIES: dict[str, Family] = {family.name: family for family in (
    Llama(),
    ViT(),
)}


def family_of(cfg) -> Family:
    if cfg.arch not in FAMILIES:
        raise ValueError(f"model.arch {cfg.arch!r} is not a registered family ({', '.join(FAMILIES)})")
    return FAMILIES[cfg.arch]


def build_model(cfg, init_seed: Optional[int] = 0) -> nn.Module:
    return family_of(cfg).build(cfg, init_seed)


def count_parameters(cfg) -> int:
    """Analytic parameter count of the family's model (tested against the built model)."""
    return family_of(cfg).count_parameters(cfg)


__all__ = ["FAMILIES", "Family", "build_model", "count_parameters", "family_of", "memory_gb", "register"]
