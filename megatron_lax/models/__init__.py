"""Model families, built from the method package (megatron_lax.method):

    llama.py   the LLaMA decoder (language modelling)
    vit.py     the Vision Transformer (image classification)
    lora.py    LoRA / LaX-LoRA adapters on a LLaMA

`FAMILIES` is the one place that maps `model.arch` to a family: its model class, its parameter
count, and the task it is trained for. Nothing else compares `arch`; a new family is one file plus
one line here (and one in config.ARCH_PROJECTIONS for its projection names).
"""
from __future__ import annotations

import importlib
from typing import NamedTuple, Optional

import torch.nn as nn

from ..config import ModelConfig


class Family(NamedTuple):
    module: str  # the family's module in this package
    model: str  # its nn.Module class, built as Model(cfg, init_seed)
    loss: str  # its loss function: (outputs, targets) -> (summed loss, scored targets)
    task: str  # the task (megatron_lax.tasks) it is trained for by default
    uses_tokenizer: bool  # its inputs are token ids (vocabulary from a tokenizer), else images
    run_prefix: str  # experiments name its runs' folders with it


FAMILIES = {
    "llama": Family("llama", "LlamaLax", "token_nll", "language_modeling", True, ""),
    "vit": Family("vit", "ViTLax", "classification_loss", "image_classification", False, "vit_"),
}


def family_of(cfg: ModelConfig) -> Family:
    return FAMILIES[cfg.arch]


def family_module(cfg: ModelConfig):
    return importlib.import_module(f"{__name__}.{family_of(cfg).module}")


def build_model(cfg: ModelConfig, init_seed: Optional[int] = 0) -> nn.Module:
    return getattr(family_module(cfg), family_of(cfg).model)(cfg, init_seed)


def loss_function(cfg: ModelConfig):
    return getattr(family_module(cfg), family_of(cfg).loss)


def count_parameters(cfg: ModelConfig) -> int:
    """Analytic parameter count of the family's model (tested against the built model)."""
    return family_module(cfg).count_parameters(cfg)
