"""Behaviour of the model: LaX identities, SVD = dense equivalence, causality, parameter counts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_lax.config import PROJECTIONS, load_config
from megatron_lax.model import LlamaLax, TensorGate, count_parameters

VOCAB = 97


def build(method="svd", gate="none", seed=0, **overrides):
    values = {"model.method": method, "model.lax_gate": gate, "model.vocab_size": VOCAB, "model.dim": 32,
              "model.n_layers": 3, "model.n_heads": 4, "model.ffn_dim": 48, "model.rank": 8}
    values.update(overrides)
    cfg = load_config("llama_tiny", values)
    torch.manual_seed(seed)
    return LlamaLax(cfg.model).eval(), cfg


def tokens(batch=2, length=12, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize(model, seed=3):
    """Moves LaX LayerNorms and gates off their initial values so the identities test real maps."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm." in name or ".gate." in name and "gate.A" not in name and "gate.B" not in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def test_identity_gate_projection_matches_hand_computation():
    model, _ = build("svd", "identity")
    randomize(model)
    layer1 = model.layers[1].attn.q
    x_prev, x = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    _, z_prev = model.layers[0].attn.q(x_prev)
    y, z = layer1(x, z_prev)
    A, B, ln = layer1.A.weight, layer1.B.weight, layer1.norm
    expected_z = F.layer_norm(x @ A.T + z_prev, (A.shape[0],), ln.weight, ln.bias, ln.eps)
    torch.testing.assert_close(z, expected_z)
    torch.testing.assert_close(y, expected_z @ B.T)


def test_cola_lax_applies_silu_after_the_norm_and_hands_it_on():
    model, _ = build("cola", "identity")
    randomize(model)
    proj = model.layers[2].mlp.down
    x, z_prev = torch.randn(2, 5, 48), torch.randn(2, 5, 8)
    y, z = proj(x, z_prev)
    ln = proj.norm
    expected_z = F.silu(F.layer_norm(x @ proj.A.weight.T + z_prev, (8,), ln.weight, ln.bias, ln.eps))
    torch.testing.assert_close(z, expected_z)
    torch.testing.assert_close(y, expected_z @ proj.B.weight.T)


@pytest.mark.parametrize("gate", ["identity", "linear", "dense", "tensor"])
def test_first_block_has_no_crossing_and_later_blocks_do(gate):
    model, _ = build("svd", gate)
    for name in PROJECTIONS:
        first = getattr(model.layers[0].attn if name in "qkvo" else model.layers[0].mlp, name)
        later = getattr(model.layers[1].attn if name in "qkvo" else model.layers[1].mlp, name)
        assert first.norm is None and first.gate is None
        assert later.norm is not None and later.gate is not None


def test_lax_modules_selects_which_projections_cross():
    model, _ = build("svd", "identity", **{"model.lax_modules": "q,down"})
    block = model.layers[1]
    assert block.attn.q.norm is not None and block.mlp.down.norm is not None
    assert all(getattr(block.attn, n).norm is None for n in "kvo")
    assert all(getattr(block.mlp, n).norm is None for n in ("gate", "up"))


@pytest.mark.parametrize("method", ["svd", "cola"])
def test_gate_none_equals_plain_low_rank_model(method):
    """With no crossing anywhere, the LaX model (identity gate, no modules) is the plain model."""
    plain, _ = build(method, "none")
    no_crossing, _ = build(method, "identity", **{"model.lax_modules": ""})
    no_crossing.load_state_dict(plain.state_dict())
    x = tokens()
    torch.testing.assert_close(no_crossing(x), plain(x))
    # ...and it is B act(A x) in every projection: recompute block 0's q by hand.
    q = plain.layers[0].attn.q
    h = torch.randn(3, 32)
    act = F.silu if method == "cola" else (lambda t: t)
    torch.testing.assert_close(q(h)[0], act(h @ q.A.weight.T) @ q.B.weight.T)


def test_lax_changes_the_function():
    plain, _ = build("svd", "none")
    lax, _ = build("svd", "identity")
    lax.load_state_dict(plain.state_dict(), strict=False)
    x = tokens()
    assert not torch.allclose(lax(x), plain(x))


@pytest.mark.parametrize("gate", ["identity", "linear", "dense", "tensor"])
def test_gradient_reaches_previous_block_through_the_crossing(gate):
    model, _ = build("svd", gate)
    block0, block1 = model.layers[0], model.layers[1]
    _, z0 = block0.attn.q(torch.randn(2, 5, 32))
    y1, _ = block1.attn.q(torch.randn(2, 5, 32), z0)  # block 1's input does not depend on block 0
    y1.square().sum().backward()
    grad = block0.attn.q.A.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_without_lax_previous_block_gets_no_gradient_from_the_next_projection():
    model, _ = build("svd", "none")
    _, z0 = model.layers[0].attn.q(torch.randn(2, 5, 32))
    y1, _ = model.layers[1].attn.q(torch.randn(2, 5, 32), z0)
    y1.square().sum().backward()
    assert model.layers[0].attn.q.A.weight.grad is None


def test_tensor_gate_is_a_kronecker_factored_map():
    gate = TensorGate(12)
    assert (gate.r0, gate.r1) == (3, 4)
    with torch.no_grad():
        gate.core0.copy_(torch.randn(3, 3))
        gate.core1.copy_(torch.randn(4, 4))
    z = torch.randn(5, 12)
    torch.testing.assert_close(gate(z), z @ torch.kron(gate.core0, gate.core1).T)


def test_svd_model_equals_dense_model_with_merged_weights():
    svd, cfg = build("svd", "none")
    dense, _ = build("dense", "none")
    merged = {}
    for name, value in svd.state_dict().items():
        if name.endswith(".A.weight"):
            prefix = name[: -len(".A.weight")]
            merged[prefix + ".weight"] = svd.state_dict()[prefix + ".B.weight"] @ value
        elif not name.endswith(".B.weight"):
            merged[name] = value
    dense.load_state_dict(merged)
    x = tokens()
    torch.testing.assert_close(dense(x), svd(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method,gate", [("dense", "none"), ("svd", "none"), ("cola", "none")]
                         + [(m, g) for m in ("svd", "cola") for g in ("identity", "linear", "dense", "tensor")])
def test_causality(method, gate):
    model, _ = build(method, gate)
    randomize(model)
    x = tokens(length=10)
    changed = x.clone()
    changed[:, 6:] = (changed[:, 6:] + 5) % VOCAB
    before, after = model(x), model(changed)
    torch.testing.assert_close(before[:, :6], after[:, :6])
    assert not torch.allclose(before[:, 6:], after[:, 6:])


@pytest.mark.parametrize("preset,dense_m,svd_m", [("llama_60m", 58, 43), ("llama_130m", 134, 94),
                                                  ("llama_350m", 368, 185), ("llama_1b", 1339, 609)])
def test_parameter_counts_match_the_paper(preset, dense_m, svd_m):
    dense = count_parameters(load_config(preset, {"model.method": "dense"}).model) / 1e6
    svd = count_parameters(load_config(preset, {"model.method": "svd"}).model) / 1e6
    lax = count_parameters(load_config(preset, {"model.method": "svd", "model.lax_gate": "identity"}).model) / 1e6
    assert abs(dense - dense_m) < 1 and abs(svd - svd_m) < 1
    cfg = load_config(preset).model
    layernorms = (cfg.n_layers - 1) * sum(2 * cfg.rank_of(p) for p in PROJECTIONS)
    assert lax * 1e6 == svd * 1e6 + layernorms  # identity LaX adds only its LayerNorms


@pytest.mark.parametrize("method,gate", [("dense", "none"), ("svd", "linear"), ("cola", "dense"), ("svd", "tensor")])
def test_analytic_count_equals_built_model(method, gate):
    model, cfg = build(method, gate, **{"model.attn_rank": 6, "model.mlp_rank": 12})
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg.model)


def test_separate_attention_and_mlp_ranks():
    model, _ = build("svd", "none", **{"model.attn_rank": 6, "model.mlp_rank": 12})
    assert model.layers[0].attn.k.A.weight.shape == (6, 32)
    assert model.layers[0].mlp.up.A.weight.shape == (12, 32)


def test_low_rank_product_has_dense_variance():
    torch.manual_seed(0)
    cfg = load_config("llama_60m", {"model.method": "svd"}).model
    from megatron_lax.model import LowRankLinear
    layer = LowRankLinear(512, 1376, 128, cfg.init_std, activation=False, gate=None)
    product = layer.B.weight @ layer.A.weight
    assert abs(product.std().item() - cfg.init_std) / cfg.init_std < 0.05
