"""Two model families over one low-rank core:

    lowrank.py        dense / SVD / CoLA formats, LaX gates and the crossing, make_linear
    tensor_train.py   tensor-train (TT-matrix) layers with inter- and intra-layer LaX
    llama.py          the LLaMA decoder (language modelling)
    vit.py            the Vision Transformer (image classification)

`build_model`, `loss_function` and `count_parameters` choose the family from `model.arch`, so the
engines and the training loop never name one.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from ..config import ModelConfig


def build_model(cfg: ModelConfig, init_seed: Optional[int] = 0) -> nn.Module:
    if cfg.arch == "vit":
        from .vit import ViTLax
        return ViTLax(cfg, init_seed)
    from .llama import LlamaLax
    return LlamaLax(cfg, init_seed)


def loss_function(cfg: ModelConfig):
    """(outputs, targets) -> (summed loss, number of scored targets)."""
    if cfg.arch == "vit":
        from .vit import classification_loss
        return classification_loss
    from .llama import token_nll
    return token_nll


def count_parameters(cfg: ModelConfig) -> int:
    if cfg.arch == "vit":
        from .vit import count_parameters as vit_count
        return vit_count(cfg)
    from .llama import count_parameters as llama_count
    return llama_count(cfg)
