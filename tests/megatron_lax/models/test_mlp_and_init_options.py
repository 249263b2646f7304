"""CoLA's MLP without the SwiGLU's own SiLU (`model.only_latent_act`, CoLA's only_lr_act) and the
GPT-2 residual-branch init scaling (`model.residual_scale`)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_lax.config import ConfigError, load_config
from megatron_lax.models.llama import LlamaLax, init_rules


def build(**overrides):
    values = {"model.vocab_size": 97, "model.dim": 32, "model.n_layers": 3, "model.n_heads": 4,
              "model.ffn_dim": 48, "model.rank": 8, **overrides}
    cfg = load_config("llama_tiny", values)
    return LlamaLax(cfg.model, init_seed=0).eval(), cfg


@pytest.mark.parametrize("gate", ["none", "identity"])
def test_only_latent_act_drops_the_swiglu_silu_and_keeps_the_latent_one(gate):
    model, _ = build(**{"model.method": "cola", "model.lax_gate": gate, "model.only_latent_act": "true"})
    mlp = model.layers[0].mlp
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    cola = lambda layer, v: layer.B(F.silu(layer.A(v)))  # block 0: no crossing
    expected = cola(mlp.down, cola(mlp.gate, x) * cola(mlp.up, x))
    got = mlp(x, {}, {})
    assert torch.allclose(got, expected, atol=1e-6)
    both, _ = build(**{"model.method": "cola", "model.lax_gate": gate})
    both.load_state_dict(model.state_dict())
    got_default = both.layers[0].mlp(x, {}, {})
    expected_default = cola(mlp.down, F.silu(cola(mlp.gate, x)) * cola(mlp.up, x))
    assert torch.allclose(got_default, expected_default, atol=1e-6)
    assert not torch.allclose(got, got_default)


def test_only_latent_act_needs_cola():
    with pytest.raises(ConfigError, match="only_latent_act"):
        load_config("llama_tiny", {"model.method": "svd", "model.rank": "8", "model.only_latent_act": "true"})


@pytest.mark.parametrize("method", ["dense", "svd", "cola"])
def test_residual_scale_shrinks_only_the_last_layer_of_each_residual_branch(method):
    _, plain = build(**{"model.method": method})
    model, scaled = build(**{"model.method": method, "model.residual_scale": "true"})
    before, after = init_rules(model, plain.model), init_rules(model, scaled.model)
    factor = (2 * 3) ** -0.5
    last = ("attn.o.weight", "mlp.down.weight") if method == "dense" else ("attn.o.B.weight", "mlp.down.B.weight")
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {f"layers.{i}.{p}" for i in range(3) for p in last}
    for name in changed:
        assert after[name][1] == pytest.approx(before[name][1] * factor)
    std = model.layers[1].attn.o.weight.std() if method == "dense" else model.layers[1].attn.o.B.weight.std()
    assert float(std) == pytest.approx(after[f"layers.1.attn.o.{'weight' if method == 'dense' else 'B.weight'}"][1],
                                       rel=0.1)  # the built model follows the rule
