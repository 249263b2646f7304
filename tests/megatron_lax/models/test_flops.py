"""flops_per_token against what the built model actually multiplies: 2 FLOPs per weight per token
forward, 3x that for training, plus attention, plus LaX's (small) extras."""
from __future__ import annotations

import pytest
import torch.nn as nn

from megatron_lax.config import PRESETS, load_config
from megatron_lax.models.llama import LlamaLax, flops_per_token
from megatron_lax.method.lowrank import DenseGate, LowRankLinear

SMALL = {"model.vocab_size": 96, "model.dim": 32, "model.n_layers": 3, "model.n_heads": 4, "model.ffn_dim": 48,
         "model.rank": 8}


def config(**overrides):
    return load_config("llama_tiny", {**SMALL, **{f"model.{k}": v for k, v in overrides.items()}}).model


def matmul_weights(model: nn.Module) -> int:
    """Weights that multiply every token's activations: all nn.Linear weights (embedding lookups
    and norms excluded)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def attention_train_flops(cfg, seq_len) -> int:
    """Scores and weighted sum: 2 matmuls of T x d per token per layer, 2 FLOPs per MAC, x3 for training."""
    return 3 * 2 * 2 * seq_len * cfg.dim * cfg.n_layers


@pytest.mark.parametrize("method", ["dense", "svd", "cola"])
def test_training_flops_are_six_per_matmul_weight_plus_attention(method):
    cfg = config(method=method)
    flops = flops_per_token(cfg, seq_len=64)
    assert flops["train"] == 3 * flops["forward"]
    assert flops["train"] == 6 * matmul_weights(LlamaLax(cfg)) + attention_train_flops(cfg, 64)


def test_attention_term_grows_linearly_with_sequence_length():
    cfg = config(method="dense")
    short, long = flops_per_token(cfg, 100)["train"], flops_per_token(cfg, 300)["train"]
    assert long - short == attention_train_flops(cfg, 200)


def test_lm_head_is_counted():
    grown = flops_per_token(config(vocab_size=96 + 64), 16)["forward"] - flops_per_token(config(), 16)["forward"]
    assert grown == 2 * 64 * SMALL["model.dim"]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_low_rank_costs_less_than_dense_at_the_paper_shapes(preset):
    def train_flops(method):
        cfg = load_config(preset, {"model.vocab_size": 32000, "model.method": method}).model
        return flops_per_token(cfg, 256)["train"]

    dense = train_flops("dense")
    assert train_flops("svd") < dense and train_flops("cola") < dense


def test_lower_rank_costs_less():
    costs = [flops_per_token(config(method="svd", rank=r), 64)["train"] for r in (4, 8, 16)]
    assert costs == sorted(costs) and len(set(costs)) == 3


def test_dense_gate_adds_six_r_squared_per_crossing_projection():
    identity, dense = config(method="svd", lax_gate="identity"), config(method="svd", lax_gate="dense")
    crossings = sum(isinstance(m, DenseGate) for m in LlamaLax(dense).modules())
    assert crossings == (SMALL["model.n_layers"] - 1) * 7  # every projection of every block but the first
    r = SMALL["model.rank"]
    extra = flops_per_token(dense, 64)["train"] - flops_per_token(identity, 64)["train"]
    assert extra == 6 * r * r * crossings


def test_lax_overhead_is_small_and_ordered_by_gate():
    """Identity < linear < tensor < dense, and even the identity gate's add + LayerNorm is a
    fraction of a percent at the 60M shapes (rank 128 against d = 512)."""
    def train_flops(gate):
        cfg = load_config("llama_60m", {"model.method": "svd", "model.lax_gate": gate}).model
        return flops_per_token(cfg, 256)["train"]

    base = train_flops("none")
    costs = [train_flops(g) for g in ("identity", "linear", "tensor", "dense")]
    assert base < costs[0] < costs[1] < costs[2] < costs[3]
    assert costs[0] / base - 1 < 0.01


def test_lax_cost_scales_with_the_number_of_crossing_projections():
    base = flops_per_token(config(method="cola"), 64)["train"]
    every = flops_per_token(config(method="cola", lax_gate="dense"), 64)["train"] - base
    attention_only = config(method="cola", lax_gate="dense", lax_modules="q,k,v,o")
    crossing = [m for m in LlamaLax(attention_only).modules() if isinstance(m, LowRankLinear) and m.lax_gate is not None]
    assert len(crossing) == 4 * (SMALL["model.n_layers"] - 1)
    assert flops_per_token(attention_only, 64)["train"] - base == every * 4 // 7
