"""Behaviour of the model: LaX identities, SVD = dense equivalence, causality, parameter counts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_lax.config import PROJECTIONS, load_config
from megatron_lax.models.llama import LlamaLax, count_parameters
from megatron_lax.method.lowrank import TensorGate

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
            if ".lax_norm." in name or ".lax_gate." in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def test_identity_gate_projection_matches_hand_computation():
    model, _ = build("svd", "identity")
    randomize(model)
    layer1 = model.layers[1].attn.q
    x_prev, x = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    _, z_prev = model.layers[0].attn.q(x_prev)
    y, z = layer1(x, z_prev)
    A, B, ln = layer1.A.weight, layer1.B.weight, layer1.lax_norm
    expected_z = F.layer_norm(x @ A.T + z_prev, (A.shape[0],), ln.weight, ln.bias, ln.eps)
    torch.testing.assert_close(z, expected_z)
    torch.testing.assert_close(y, expected_z @ B.T)


def test_cola_lax_applies_silu_after_the_norm_and_hands_it_on():
    model, _ = build("cola", "identity")
    randomize(model)
    proj = model.layers[2].mlp.down
    x, z_prev = torch.randn(2, 5, 48), torch.randn(2, 5, 8)
    y, z = proj(x, z_prev)
    ln = proj.lax_norm
    expected_z = F.silu(F.layer_norm(x @ proj.A.weight.T + z_prev, (8,), ln.weight, ln.bias, ln.eps))
    torch.testing.assert_close(z, expected_z)
    torch.testing.assert_close(y, expected_z @ proj.B.weight.T)


@pytest.mark.parametrize("gate", ["identity", "linear", "dense", "tensor"])
def test_first_block_has_no_crossing_and_later_blocks_do(gate):
    model, _ = build("svd", gate)
    for name in PROJECTIONS:
        first = getattr(model.layers[0].attn if name in "qkvo" else model.layers[0].mlp, name)
        later = getattr(model.layers[1].attn if name in "qkvo" else model.layers[1].mlp, name)
        assert first.lax_norm is None and first.lax_gate is None
        assert later.lax_norm is not None and later.lax_gate is not None


def test_lax_modules_selects_which_projections_cross():
    model, _ = build("svd", "identity", **{"model.lax_modules": "q,down"})
    block = model.layers[1]
    assert block.attn.q.lax_norm is not None and block.mlp.down.lax_norm is not None
    assert all(getattr(block.attn, n).lax_norm is None for n in "kvo")
    assert all(getattr(block.mlp, n).lax_norm is None for n in ("gate", "up"))


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
    assert gate.in_shape == gate.out_shape == (3, 4)
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
    paper = {"model.vocab_size": 32000}  # Table 5 counts the T5 tokenizer's 32,000 pieces
    dense = count_parameters(load_config(preset, {**paper, "model.method": "dense"}).model) / 1e6
    svd = count_parameters(load_config(preset, {**paper, "model.method": "svd"}).model) / 1e6
    lax = count_parameters(load_config(preset, {**paper, "model.method": "svd", "model.lax_gate": "identity"}).model) / 1e6
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


def one_block_60m(method, init, **overrides):
    """llama_60m projection shapes (dim 512, ffn 1376, rank 128), one block, a small vocabulary."""
    values = {"model.method": method, "model.lowrank_init": init, "model.vocab_size": 64, "model.n_layers": 1}
    values.update(overrides)
    return LlamaLax(load_config("llama_60m", values).model)


@pytest.mark.parametrize("name,d_in,d_out", [("attn.q", 512, 512), ("mlp.up", 512, 1376), ("mlp.down", 1376, 512)])
def test_cola_reference_init_factor_and_product_variances(name, d_in, d_out):
    layer = one_block_60m("svd", "cola").layers[0].get_submodule(name)
    r = 128
    for factor in (layer.A.weight, layer.B.weight):
        assert factor.std().item() == pytest.approx((r * (d_in + d_out)) ** -0.25, rel=0.03)
    product = layer.B.weight @ layer.A.weight
    assert product.std().item() == pytest.approx((d_in + d_out) ** -0.5, rel=0.05)


@pytest.mark.parametrize("name", ["attn.o", "mlp.up", "mlp.down"])
def test_matched_init_gives_the_product_a_dense_layers_std(name):
    layer = one_block_60m("cola", "matched").layers[0].get_submodule(name)
    assert (layer.B.weight @ layer.A.weight).std().item() == pytest.approx(0.02, rel=0.05)


def test_auto_init_follows_the_per_method_default():
    from megatron_lax.method.formats import FORMATS
    for method, init in (("svd", FORMATS["svd"].default_lowrank_init), ("cola", FORMATS["cola"].default_lowrank_init)):
        auto = one_block_60m(method, "auto").layers[0].attn.q.A.weight
        explicit = one_block_60m(method, init).layers[0].attn.q.A.weight
        torch.testing.assert_close(auto, explicit)


def test_lax_layernorm_makes_the_latent_unit_scale_whatever_the_init():
    """Why the init matters so much with LaX: the LayerNorm rescales A x (+ the crossing) to unit
    RMS, so B's initial std alone sets the projection's output scale. Without LaX the latent keeps
    A's scale. Recorded with the latent-RMS introspection."""
    from megatron_lax.training.introspection import latent_rms
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    stats = {}
    for init in ("cola", "matched"):
        for gate in ("none", "identity"):
            model = one_block_60m("svd", init, **{"model.n_layers": 2, "model.lax_gate": gate})
            stats[init, gate] = latent_rms(model, lambda: model(x))
    for init in ("cola", "matched"):
        assert stats[init, "identity"]["lax_rms/up/1/latent"] == pytest.approx(1.0, rel=0.05)
    # without LaX the latent's scale is A's, which differs by the ratio of the factor stds
    ratio = stats["cola", "none"]["lax_rms/up/1/latent"] / stats["matched", "none"]["lax_rms/up/1/latent"]
    expected = ((128 * (512 + 1376)) ** -0.25) / (0.02 / 128 ** 0.5) ** 0.5
    assert ratio == pytest.approx(expected, rel=0.1)


@pytest.mark.parametrize("method", ["svd", "cola"])
def test_projection_latent_hands_on_a_x_before_norm_and_activation(method):
    """lax_latent projection: the paper's equations 2-5, h_i = A_i x_i crosses; the output is still
    B act(LN(A_i x_i + G(h_{i-1})))."""
    model, _ = build(method, "identity", **{"model.lax_latent": "projection"})
    randomize(model)
    first, second = model.layers[0].mlp.up, model.layers[1].mlp.up
    x0, x1 = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    y0, h0 = first(x0)
    torch.testing.assert_close(h0, x0 @ first.A.weight.T)
    act = F.silu if method == "cola" else (lambda t: t)
    torch.testing.assert_close(y0, act(x0 @ first.A.weight.T) @ first.B.weight.T)
    y1, h1 = second(x1, h0)
    ln = second.lax_norm
    z1 = act(F.layer_norm(x1 @ second.A.weight.T + h0, (8,), ln.weight, ln.bias, ln.eps))
    torch.testing.assert_close(h1, x1 @ second.A.weight.T)
    torch.testing.assert_close(y1, z1 @ second.B.weight.T)


def test_small_dense_gate_init_starts_near_zero_with_a_bias():
    model, cfg = build("cola", "dense", **{"model.lax_gate_init": "small", "model.rank": 32, "model.dim": 64,
                                           "model.ffn_dim": 96})
    gate = model.layers[1].attn.v.lax_gate
    assert gate.weight.std().item() == pytest.approx(0.02, rel=0.1) and torch.equal(gate.bias, torch.zeros(32))
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg.model)
    identity, _ = build("cola", "dense")
    assert torch.equal(identity.layers[1].attn.v.lax_gate.weight, torch.eye(8))


def test_initial_weights_depend_on_the_seed_and_names_not_on_how_the_model_is_built():
    from megatron_lax.method.init import init_weights
    a, cfg = build("cola", "dense")
    with torch.device("meta"):
        b = LlamaLax(cfg.model, init_seed=None)
    b.to_empty(device="cpu")
    init_weights(b, 0)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    c = LlamaLax(cfg.model, init_seed=1)
    assert not torch.equal(a.layers[0].attn.q.A.weight, c.layers[0].attn.q.A.weight)


def test_rotary_tables_stay_fp32_in_a_bf16_model():
    model, _ = build("svd", "identity")
    assert list(model.buffers()) == []  # nothing a dtype cast could round
    x = tokens()
    expected = model(x)
    model.to(torch.bfloat16)
    from megatron_lax.models.llama import rotary_tables
    cos, _ = rotary_tables(8, 12, 10000.0)
    assert cos.dtype == torch.float32
    assert (model(x).float() - expected).abs().max() < 0.1 * expected.abs().max()


def test_gates_take_no_weight_decay():
    from megatron_lax.parallel.optim import param_groups
    model, _ = build("svd", "dense")
    decay, no_decay = param_groups(model, 0.01)
    gate_ids = {id(p) for n, p in model.named_parameters() if ".lax_gate." in n}
    assert gate_ids and gate_ids <= {id(p) for p in no_decay["params"]}
    assert not gate_ids & {id(p) for p in decay["params"]}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
