"""LoRA and LaX-LoRA adapters: the step-0 identity, the forward formulas, what trains, merging."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from megatron_lax.config import LoraConfig, ModelConfig
from megatron_lax.models.lora import LoraLinear, apply_lora, merge_lora, strip_lora, trainable_parameters
from megatron_lax.models.llama import LlamaLax

SHAPE = ModelConfig(dim=32, n_layers=3, n_heads=2, ffn_dim=48, vocab_size=64)
TOKENS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def adapted(**lora) -> tuple[LlamaLax, LlamaLax]:
    base = LlamaLax(SHAPE, init_seed=1)
    return base, apply_lora(copy.deepcopy(base), LoraConfig(rank=4, alpha=8, **lora), seed=3)


def randomise_adapters(model: LlamaLax, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("gate,norm,latent", [("none", True, "output"), ("identity", True, "output"),
                                              ("linear", True, "output"), ("dense", True, "output"),
                                              ("tensor", True, "output"), ("identity", False, "output"),
                                              ("linear", True, "projection")])
def test_step_zero_computes_the_base_logits_exactly(gate, norm, latent):
    base, model = adapted(lax_gate=gate, lax_norm=norm, lax_latent=latent)
    with torch.no_grad():
        assert torch.equal(model(TOKENS), base(TOKENS))
    randomise_adapters(model)
    with torch.no_grad():
        assert not torch.allclose(model(TOKENS), base(TOKENS))


def test_lora_projection_is_base_plus_scaled_update():
    _, model = adapted()
    randomise_adapters(model)
    q = model.layers[1].attn.q
    x = torch.randn(2, 5, SHAPE.dim)
    y, latent = q(x)
    expected = F.linear(x, q.base.weight) + 2.0 * F.linear(F.linear(x, q.adapter.A.weight), q.adapter.B.weight)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(latent, F.linear(x, q.adapter.A.weight))


@pytest.mark.parametrize("latent", ["output", "projection"])
def test_lax_lora_crosses_the_previous_blocks_latent_through_gate_and_layernorm(latent):
    _, model = adapted(lax_gate="linear", lax_latent=latent)
    randomise_adapters(model)
    first, second = model.layers[0].attn.v, model.layers[1].attn.v
    assert first.adapter.lax_gate is None and second.adapter.lax_gate is not None  # block 0 has no gate
    x0, x1 = torch.randn(2, 5, SHAPE.dim), torch.randn(2, 5, SHAPE.dim)
    _, z0 = first(x0)
    y1, z1 = second(x1, z0)
    a = second.adapter
    h = F.linear(x1, a.A.weight)
    z = F.layer_norm(h + a.lax_gate.beta * z0, (4,), a.lax_norm.weight, a.lax_norm.bias)
    torch.testing.assert_close(y1, F.linear(x1, second.base.weight) + 2.0 * F.linear(z, a.B.weight))
    torch.testing.assert_close(z1, z if latent == "output" else h)


@pytest.mark.parametrize("gate,extra_per_adapter", [("none", 0), ("identity", 8), ("linear", 9), ("dense", 24),
                                                    ("tensor", 16)])
def test_only_adapters_train_and_lax_adds_only_gates_and_norms(gate, extra_per_adapter):
    """q,k,v: 32 -> 32, up: 32 -> 48, down: 48 -> 32; rank 4. LaX (blocks 1, 2) adds a LayerNorm (2r)
    and the gate (linear 1, dense r^2, tensor 2^2 + 2^2) per adapter."""
    base, model = adapted(lax_gate=gate)
    lora = 3 * SHAPE.n_layers * 4 * (32 + 32) + 2 * SHAPE.n_layers * 4 * (32 + 48)
    assert trainable_parameters(model) == lora + 5 * (SHAPE.n_layers - 1) * extra_per_adapter
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert len(frozen) == len(list(base.parameters()))
    assert all(".adapter." in name for name, p in model.named_parameters() if p.requires_grad)


def test_adapters_are_seeded_per_parameter_and_b_starts_at_zero():
    _, one = adapted()
    _, two = adapted()
    a_one, a_two = one.layers[2].mlp.down.adapter, two.layers[2].mlp.down.adapter
    assert torch.equal(a_one.A.weight, a_two.A.weight) and not torch.equal(a_one.A.weight, one.layers[1].mlp.down.adapter.A.weight)
    assert a_one.A.weight.abs().max() <= 48 ** -0.5 and not a_one.B.weight.any()


def test_merging_plain_lora_gives_a_dense_model_with_the_same_logits():
    _, model = adapted()
    randomise_adapters(model)
    with torch.no_grad():
        before = model(TOKENS)
        merged = merge_lora(model)
        assert not any(isinstance(m, LoraLinear) for m in merged.modules())
        torch.testing.assert_close(merged(TOKENS), before, rtol=1e-5, atol=1e-5)


def test_lax_lora_cannot_be_merged_and_strip_gives_back_the_base():
    base, model = adapted(lax_gate="identity")
    randomise_adapters(model)
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_lora(model)
    with torch.no_grad():
        assert torch.equal(strip_lora(model)(TOKENS), base(TOKENS))


def test_adapters_that_do_not_fit_the_base_are_refused():
    with pytest.raises(ValueError, match="lora.rank 40 is larger than the q projection allows"):
        apply_lora(LlamaLax(SHAPE), LoraConfig(rank=40))
    svd = LlamaLax(ModelConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=48, vocab_size=64, method="svd", rank=4))
    with pytest.raises(ValueError, match="needs plain linear projections"):
        apply_lora(svd, LoraConfig(rank=4))


def test_at_rank_1_the_layernorm_of_lax_makes_each_crossed_adapter_a_constant():
    """What the study's rank-1 cells run into: a LayerNorm over one feature outputs its bias, so every
    gate and latent gives the same adapter (block 0, which does not cross, stays LoRA)."""
    outputs = {}
    for norm in (True, False):
        base = LlamaLax(SHAPE, init_seed=1)
        model = apply_lora(base, LoraConfig(rank=1, alpha=2, lax_gate="linear", lax_norm=norm), seed=3)
        randomise_adapters(model)
        x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
        z0 = model.layers[0].attn.q.adapter(x)[1]
        _, z1 = model.layers[1].attn.q.adapter(x, z0)
        outputs[norm] = z1
    assert torch.allclose(outputs[True], outputs[True][0, 0].expand_as(outputs[True]))  # the LayerNorm's bias
    assert outputs[False].std() > 0.1  # without it, the latent depends on the input
