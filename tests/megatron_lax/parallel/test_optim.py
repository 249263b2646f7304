"""The learning-rate schedule and the optimizer's parameter groups."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_lax.config import OptimConfig
from megatron_lax.parallel.optim import build_optimizer, lr_at


def test_warmup_then_cosine_to_min_ratio():
    cfg = OptimConfig(lr=1e-2, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # rising warmup
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # non-increasing decay
    assert lrs[-1] == pytest.approx(1e-3)  # 10% of the peak at the last step
    mid = 10 + (100 - 10 - 1) / 2
    assert lr_at(int(mid), 100, cfg) == pytest.approx(1e-3 + 0.9e-2 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 89)))


def test_warmup_ratio_when_steps_not_given():
    cfg = OptimConfig(lr=1.0, warmup_steps=-1, warmup_ratio=0.2)
    assert lr_at(19, 100, cfg) == pytest.approx(1.0) and lr_at(9, 100, cfg) == pytest.approx(0.5)


def test_norms_and_scalar_gates_are_not_decayed():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=True), torch.nn.LayerNorm(4))
    groups = build_optimizer(model, OptimConfig(weight_decay=0.1)).param_groups
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decayed == {id(model[0].weight)}
