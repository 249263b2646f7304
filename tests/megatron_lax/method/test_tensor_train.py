"""Tensor-train layers: the contraction equals the dense matrix of its cores, intra-layer LaX equals a
hand computation, the tensor gate changes shape, and counts match the built layer."""
import math

import pytest
import torch

from megatron_lax.method.lowrank import TensorGate
from megatron_lax.method.tensor_train import (TTLinear, intra_parameters, official_rank, tt_flops, tt_parameters,
                                              tt_ranks)


def dense_from_cores(cores, in_dims, out_dims) -> torch.Tensor:
    """W[o, i] by an explicit einsum over every mode (independent of full_weight below)."""
    letters = "abcdefgh"
    n = len(cores)
    ranks = "pqrstuvwxyz"
    terms = [f"{ranks[j]}{letters[j]}{ranks[j + 1]}" for j in range(n)]
    spec = ",".join(terms) + "->" + letters[len(in_dims):n] + letters[:len(in_dims)]
    w = torch.einsum(spec, *cores).squeeze()
    return w.reshape(math.prod(out_dims), math.prod(in_dims))


def full_weight(layer: TTLinear) -> torch.Tensor:
    """The dense (d_out, d_in) matrix the cores represent, by chained tensordots."""
    w = layer.cores[0]
    for core in layer.cores[1:]:
        w = torch.tensordot(w, core, dims=([-1], [0]))
    return w.reshape(layer.in_dims + layer.out_dims).reshape(layer.d_in, layer.d_out).transpose(0, 1)


def random_layer(in_dims, out_dims, rank, **kw) -> TTLinear:
    torch.manual_seed(0)
    layer = TTLinear(in_dims, out_dims, rank, activation=None, gate=None, **kw)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


@pytest.mark.parametrize("in_dims,out_dims,rank", [([4, 6], [6, 4], 5), ([4, 6], [8, 3], 7), ([2, 3, 4], [4, 3, 2], 6),
                                                   ([5], [7], 3)])
def test_contraction_equals_the_dense_matrix_of_its_cores(in_dims, out_dims, rank):
    layer = random_layer(in_dims, out_dims, rank, bias=True)
    x = torch.randn(3, 5, math.prod(in_dims))
    w = dense_from_cores(list(layer.cores), in_dims, out_dims)
    y, _ = layer(x)
    torch.testing.assert_close(y, x @ w.T + layer.bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full_weight(layer), w, rtol=1e-5, atol=1e-5)


def test_ranks_are_clipped_to_the_largest_a_tensor_train_can_have():
    assert tt_ranks([32, 24, 24, 32], 336) == [1, 32, 336, 32, 1]  # ViT-B q, k, v, o (Table 13)
    assert tt_ranks([32, 24, 48, 64], 158) == [1, 32, 158, 64, 1]


def test_intra_layer_lax_adds_the_mirrored_partial_contraction():
    """4 cores, symmetric modes: y = C3(C2(h) + C0 x) where C0 x is the first partial contraction."""
    in_dims, out_dims = [4, 6], [6, 4]
    layer = random_layer(in_dims, out_dims, 5, intra="identity")
    c0, c1, c2, c3 = layer.cores
    x = torch.randn(7, 24)
    xs = x.view(7, 4, 6)
    partial = torch.einsum("nab,ar->nbr", xs, c0[0])  # (n, d1=6, r1=4)
    h = torch.einsum("nbr,rbs->ns", partial, c1)  # the latent
    right = torch.einsum("ns,sct->nct", h, c2)  # (n, d2=6, r3=4)
    right = right + partial  # the intra-layer pathway (shapes match: 6 x 4)
    expected = torch.einsum("nct,tdu->ncd", right, c3).reshape(7, 24)
    y, latent = layer(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(latent, h, rtol=1e-5, atol=1e-5)


def test_intra_layer_lax_with_different_shapes_goes_through_a_shape_changing_tensor_gate():
    in_dims, out_dims = [4, 6], [8, 3]  # left partial 6 x r1, right partial 8 x r3
    layer = random_layer(in_dims, out_dims, 5, intra="identity")
    gate = layer.intra_gates[0]
    assert isinstance(gate, TensorGate)
    r1, r3 = layer.ranks[1], layer.ranks[3]
    assert gate.in_shape == (6, r1) and gate.out_shape == (8, r3)
    c0, c1, c2, c3 = layer.cores
    x = torch.randn(5, 24)
    partial = torch.einsum("nab,ar->nbr", x.view(5, 4, 6), c0[0])
    h = torch.einsum("nbr,rbs->ns", partial, c1)
    mapped = gate.core0 @ partial @ gate.core1.T  # (8, r3): C0 P C1^T
    right = torch.einsum("ns,sct->nct", h, c2) + mapped
    expected = torch.einsum("nct,tdu->ncd", right, c3).reshape(5, 24)
    torch.testing.assert_close(layer(x)[0], expected, rtol=1e-5, atol=1e-5)


def test_tensor_gate_changes_shape_as_a_kronecker_product():
    torch.manual_seed(1)
    gate = TensorGate(in_shape=(3, 4), out_shape=(5, 2))
    with torch.no_grad():
        gate.core0.normal_()
        gate.core1.normal_()
    z = torch.randn(6, 12)
    torch.testing.assert_close(gate(z), z @ torch.kron(gate.core0, gate.core1).T, rtol=1e-5, atol=1e-5)
    assert gate(z).shape == (6, 10)


def test_inter_layer_lax_crosses_the_middle_latent():
    """z = LN(h + G(prev)) on the r_k-wide latent, then the output cores."""
    layer = random_layer([4, 6], [6, 4], 5)
    crossing = TTLinear([4, 6], [6, 4], 5, activation=None, gate="identity")
    crossing.load_state_dict({**layer.state_dict(), **{k: v for k, v in crossing.state_dict().items()
                                                        if k.startswith("lax_norm")}})
    x, prev = torch.randn(3, 24), torch.randn(3, 5)
    h = layer.encode(x)
    z = crossing.lax_norm(h + prev)
    y, latent = crossing(x, prev)
    torch.testing.assert_close(y, layer.decode(z), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(latent, z)


def test_counts_match_the_built_layer():
    for in_dims, out_dims, rank in (([32, 24], [24, 32], 336), ([4, 6], [8, 3], 7)):
        layer = TTLinear(in_dims, out_dims, rank, activation=None, gate=None, intra="identity")
        assert sum(p.numel() for p in layer.parameters()) == tt_parameters(in_dims, out_dims, rank) + \
            intra_parameters(in_dims, out_dims, rank, "identity")
    ranks = tt_ranks([4, 6, 8, 3], 7)
    assert tt_flops([4, 6], [8, 3], 7) == 2 * (ranks[1] * 4 * 6 + ranks[1] * 6 * ranks[2] + ranks[2] * 8 * ranks[3]
                                                + 8 * ranks[3] * 3)


@pytest.mark.parametrize("init,sigma", [("matched", 0.02), ("cola", (48 + 48) ** -0.5)])
def test_initialisation_gives_the_stated_product_std(init, sigma):
    from megatron_lax.method.init import initial_value
    layer = TTLinear([6, 8], [8, 6], 16, activation=None, gate=None)
    rules = layer.init_rules("", init, 0.02)
    stds = []
    for seed in range(20):
        with torch.no_grad():
            for j, core in enumerate(layer.cores):
                core.copy_(initial_value(*rules[f"cores.{j}"], tuple(core.shape), seed, f"cores.{j}"))
        stds.append(float(full_weight(layer).detach().std()))
    assert sum(stds) / len(stds) == pytest.approx(sigma, rel=0.1)


@pytest.mark.parametrize("modes,rank", [([32, 24, 48, 64], 158), ([48, 64, 32, 24], 159), ([48, 64, 24, 32], 156),
                                        ([32, 32, 64, 64], 198), ([64, 64, 32, 32], 198)])
def test_official_rank_rule(modes, rank):
    """The rule's middle rank: ViT-B fc1, fc2 at the official and at Table 13's modes, ViT-L fc1, fc2
    (the values the official models are built with; their counts are checked in test_vit.py)."""
    assert official_rank(modes) == rank


def test_kaiming_init_follows_the_official_layout():
    """Cores Kaiming-normal over the fan-in of the official code's tensors (d_0 x r_1 first, r x d x r'
    inner, r x d last: r_1, d r', d), the bias N(0, 1)."""
    layer = TTLinear([4, 6], [8, 3], 7, activation=None, gate=None, bias=True)
    rules = layer.init_rules("", "kaiming", 0.02)
    r = layer.ranks  # [1, 4, 7, 3, 1]
    expected = [r[1], 6 * r[2], 8 * r[3], 3]
    assert [rules[f"cores.{j}"] for j in range(4)] == [("normal", math.sqrt(2 / fan)) for fan in expected]
    assert rules["bias"] == ("normal", 1.0)


def test_kaiming_tensor_gate_and_factors():
    from megatron_lax.method.init import module_init_rules as lowrank_init_rules
    from megatron_lax.method.lowrank import LowRankLinear
    gate = TensorGate(rank=336, init="kaiming")
    rules = lowrank_init_rules(gate, "g.", "cola", 0.02)
    assert gate.in_shape == (16, 21)
    assert rules == {"g.core0": ("uniform", math.sqrt(6 / 16)), "g.core1": ("uniform", math.sqrt(6 / 21))}
    layer = LowRankLinear(768, 3072, 256, activation=None, gate="tensor", gate_init="kaiming", bias=True)
    rules = lowrank_init_rules(layer, "", "kaiming", 0.02)
    assert rules["A.weight"] == ("normal", math.sqrt(2 / 256)) and rules["B.weight"] == ("normal", math.sqrt(2 / 3072))
    assert rules["B.bias"] == ("normal", 1.0)
