"""Dense, SVD and CoLA projections, the LaX gates and the crossing that every latent format shares.

A projection maps x to y through a rank-r latent: h = encode(x), y = decode(z). With LaX (a gate),
for block i > 0

    z_i = LN(h_i + G(z_{i-1}))      then z_i = act(z_i) for CoLA      y_i = decode(z_i)

where z_{i-1} is the latent of the same-named projection of block i-1. Formats:
- `DenseLinear`: W x (no latent);
- `LowRankLinear`: encode = A, decode = B (SVD: B A x; CoLA: B act(A x));
- `TTLinear` (tensor_train.py): encode/decode are the two halves of a tensor-train contraction.

Each module that owns parameters states its initial values through `init_rules(at, init, init_std)`
(see method/init.py). The format objects that build these modules (dense.py, svd.py, cola.py,
tensor_train.py) are registered in formats.py.

Every projection returns (y, the latent it hands on), so a model's blocks carry a dict of latents
alongside the residual stream. Which latent is handed on is `latent`: `output` (z after the sum,
LayerNorm and activation; the official LaX code, recursive) or `projection` (h, the paper's eqs. 2-5).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

Latents = dict[str, torch.Tensor]

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}


# --- LaX gates: map the previous block's latent into this block's latent space ------------------

class IdentityGate(nn.Module):
    def __init__(self, rank: int, init: str = "identity"):
        super().__init__()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z

    @staticmethod
    def counts(r: int, init: str = "identity") -> tuple[int, int]:
        """(parameters, forward FLOPs per token) of the gate on a latent of width r."""
        return 0, 0


class LinearGate(nn.Module):
    """One trainable scalar; starts at 1 (the identity gate). Stored with shape (1,) because FSDP2
    shards parameters along dim 0."""

    def __init__(self, rank: int, init: str = "identity"):
        super().__init__()
        self.beta = nn.Parameter(torch.empty(1))

    def forward(self, z):
        return self.beta * z

    @staticmethod
    def counts(r: int, init: str = "identity") -> tuple[int, int]:
        return 1, r

    def init_rules(self, at: str, init: str, init_std: float) -> dict:
        return {f"{at}beta": ("ones", 0.0)}


class DenseGate(nn.Module):
    """An r x r linear map. `init identity`: starts as the identity, no bias; `small`: weight
    N(0, 0.02^2) and a zero bias, as the official LaX code starts it."""

    def __init__(self, rank: int, init: str = "identity"):
        super().__init__()
        self.init = init
        self.weight = nn.Parameter(torch.empty(rank, rank))
        self.bias = nn.Parameter(torch.empty(rank)) if init == "small" else None

    def forward(self, z):
        return F.linear(z, self.weight, self.bias)

    @staticmethod
    def counts(r: int, init: str = "identity") -> tuple[int, int]:
        return r * r + (r if init == "small" else 0), 2 * r * r

    def init_rules(self, at: str, init: str, init_std: float) -> dict:
        rules = {f"{at}weight": ("normal", 0.02) if self.init == "small" else ("eye", 0.0)}
        if self.bias is not None:
            rules[f"{at}bias"] = ("zeros", 0.0)
        return rules


def balanced_factors(n: int) -> tuple[int, int]:
    """The factor pair (r0, r1), r0 <= r1, r0 * r1 = n, with r0 as close to sqrt(n) as possible."""
    r0 = int(math.isqrt(n))
    while n % r0:
        r0 -= 1
    return r0, n // r0


class TensorGate(nn.Module):
    """The two-core tensor gate (the paper's Fig. 5): folds the latent into an r0 x r1 matrix Z and
    returns C0 Z C1^T, i.e. (C0 kron C1) z, with cores C0 (r0' x r0) and C1 (r1' x r1). Equal shapes
    (inter-layer LaX) give a Kronecker-factored r x r map with r0^2 + r1^2 parameters; different
    shapes (r0 x r1 -> r0' x r1') carry a latent into a space of another shape (intra-layer LaX of a
    tensor train). Both cores start as (rectangular) identities, or with `init kaiming` as the official
    LaX ViT code starts them: Kaiming-uniform (ReLU gain), a random map of gain about 2, far from the identity."""

    def __init__(self, rank: int = 0, init: str = "identity", in_shape: Optional[tuple[int, int]] = None,
                 out_shape: Optional[tuple[int, int]] = None):
        super().__init__()
        self.init = init
        self.in_shape = tuple(in_shape) if in_shape else balanced_factors(rank)
        self.out_shape = tuple(out_shape) if out_shape else self.in_shape
        self.core0 = nn.Parameter(torch.empty(self.out_shape[0], self.in_shape[0]))
        self.core1 = nn.Parameter(torch.empty(self.out_shape[1], self.in_shape[1]))

    def forward(self, z):
        folded = z.unflatten(-1, self.in_shape)
        out = torch.matmul(torch.matmul(self.core0, folded), self.core1.transpose(0, 1))
        return out.flatten(-2)

    @staticmethod
    def counts(r: int, init: str = "identity") -> tuple[int, int]:
        r0, r1 = balanced_factors(r)
        return r0 * r0 + r1 * r1, 2 * r * (r0 + r1)

    def init_rules(self, at: str, init: str, init_std: float) -> dict:
        if self.init == "kaiming":  # uniform on [-b, b], b = sqrt(6 / fan-in); fan-in from the shapes, not the
            # parameters, which ZeRO-3 leaves empty
            return {f"{at}core{j}": ("uniform", math.sqrt(6.0 / self.in_shape[j])) for j in (0, 1)}
        return {f"{at}core0": ("eye", 0.0), f"{at}core1": ("eye", 0.0)}


GATES = {"identity": IdentityGate, "linear": LinearGate, "dense": DenseGate, "tensor": TensorGate}


def crossing_parameters(gate: str, r: int, init: str = "identity", norm: bool = True) -> int:
    """A crossing's own parameters: its gate and the LayerNorm over the r latent features."""
    return GATES[gate].counts(r, init)[0] + (2 * r if norm else 0)


def crossing_flops(gate: str, r: int) -> int:
    """Gate, add and LayerNorm per token (the method's only extra work)."""
    return GATES[gate].counts(r)[1] + r + 8 * r


# --- linear formats ---------------------------------------------------------------------------------

class DenseLinear(nn.Linear):
    """A plain linear with the low-rank layers' call signature."""

    def __init__(self, d_in, d_out, bias: bool = False):
        super().__init__(d_in, d_out, bias=bias)

    def forward(self, x, prev_latent=None):
        return super().forward(x), None


def lowrank_factor_std(d_in: int, d_out: int, rank: int, init: str, init_std: float) -> float:
    """The std of each factor A, B. Var((B A)_jk) = r Var(A) Var(B), so with equal factor stds s the
    product has std s^2 sqrt(r).
    - cola: the CoLA reference, s = (r (d_in + d_out))^(-1/4): product std (d_in + d_out)^(-1/2).
    - matched: the product has the std of a dense layer's weights, init_std (0.02).
    (`kaiming` gives A and B different stds: kaiming_factor_stds.)"""
    if init == "cola":
        return (rank * (d_in + d_out)) ** -0.25
    return math.sqrt(init_std / math.sqrt(rank))


def kaiming_std(fan_in: int) -> float:
    """Kaiming-normal with the ReLU gain: sqrt(2 / fan_in)."""
    return math.sqrt(2.0 / fan_in)


def kaiming_factor_stds(d_out: int, rank: int) -> tuple[float, float]:
    """(std of A, std of B) under `lowrank_init kaiming`, the official LaX ViT code's: it stores A as a
    (d_in, r) and B as an (r, d_out) tensor and Kaiming-initialises each over PyTorch's fan-in of that
    layout, its second dimension: r for A, d_out for B."""
    return kaiming_std(rank), kaiming_std(d_out)


class LatentLinear(nn.Module):
    """What every latent format shares: the crossing z = act(LN(h + G(prev))). Subclasses define
    encode(x) -> h (width `rank`) and decode(z) -> y. `projection` is the name of the projection it is
    (set by whoever builds it: make_linear, apply_lora), for per-projection statistics."""
    projection: str = ""

    def __init__(self, d_in: int, d_out: int, rank: int, activation: Optional[str], gate: Optional[str],
                 gate_init: str = "identity", latent: str = "output", norm: bool = True):
        super().__init__()
        self.d_in, self.d_out, self.rank = d_in, d_out, rank
        self.activation, self.latent = activation, latent
        self.lax_gate = GATES[gate](rank, gate_init) if gate else None
        self.lax_norm = nn.LayerNorm(rank) if gate and norm else None
        self.hands_on = True  # False where the next block's projection does not cross (make_linear sets it)

    def cross(self, h, prev_latent):
        z = h
        if self.lax_gate is not None:
            z = z + self.lax_gate(prev_latent)
            if self.lax_norm is not None:
                z = self.lax_norm(z)
        return ACTIVATIONS[self.activation](z) if self.activation else z

    def forward(self, x, prev_latent=None):
        h = self.encode(x)
        z = self.cross(h, prev_latent)
        return self.decode(z), self.handed_on(h, z)

    def handed_on(self, h, z):
        """The latent the same projection of the next block crosses with, or None where it does not
        cross (no LaX): a latent handed on would be kept alive across blocks for nothing."""
        if not self.hands_on:
            return None
        return z if self.latent == "output" else h


class LowRankLinear(LatentLinear):
    """y = B z with z = A x (SVD) or act(A x) (CoLA), plus LaX when a gate is given; `norm=False`
    leaves the LayerNorm out. A bias, where the model has one, sits on B."""

    def __init__(self, d_in, d_out, rank, activation: Optional[str], gate: Optional[str], gate_init: str = "identity",
                 latent: str = "output", norm: bool = True, bias: bool = False):
        super().__init__(d_in, d_out, rank, activation, gate, gate_init, latent, norm)
        self.A = nn.Linear(d_in, rank, bias=False)
        self.B = nn.Linear(rank, d_out, bias=bias)

    def encode(self, x):
        return self.A(x)

    def kept_matmul(self) -> tuple[int, int]:
        """What low-rank recompute (train.activation_checkpointing lowrank, CoLA-M) keeps of this
        projection: the output of the matmul that makes the latent, A x, named by its (input width,
        output width). Everything after it (crossing, activation, B) is recomputed from it."""
        return self.d_in, self.rank

    def decode(self, z):
        return self.B(z)

    def init_rules(self, at: str, init: str, init_std: float) -> dict:
        if init == "kaiming":
            std_a, std_b = kaiming_factor_stds(self.d_out, self.rank)
        else:
            std_a = std_b = lowrank_factor_std(self.d_in, self.d_out, self.rank, init, init_std)
        rules = {f"{at}A.weight": ("normal", std_a), f"{at}B.weight": ("normal", std_b)}
        if self.B.bias is not None:
            rules[f"{at}B.bias"] = bias_init_rule(init)
        return rules


def bias_init_rule(init: str) -> tuple[str, float]:
    """A low-rank projection's bias: zero, or N(0, 1) under `kaiming`, as the official LaX ViT code
    leaves it (torch.randn, which its timm initialisation does not revisit)."""
    return ("normal", 1.0) if init == "kaiming" else ("zeros", 0.0)


def gate_parameter_names(model: nn.Module) -> set[str]:
    """The names of every LaX gate's parameters in a model."""
    return {f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules() if isinstance(module, tuple(GATES.values()))
            for name, _ in module.named_parameters()}


# --- what a projection keeps for the backward pass (the plan's activation count) ---------------------
# Bytes per token that a projection leaves saved for backward beyond its input (the block counts the
# input, which q, k and v share), for train.activation_checkpointing `none`, `block` or `lowrank`,
# with activations of `a` bytes (4: fp32, 2: bf16; CUDA keeps a bf16 LayerNorm's two statistics in
# fp32, 4 bytes more per crossing than counted here). Derived from the
# operations in forward() and checked against a real forward pass's saved tensors (tests).

def latent_saved_bytes(cfg, r: int, layer: int, projection: str, activation: bool, mode: str, a: int) -> int:
    """The latent part every latent format shares: what B (or CoLA's activation) reads, the crossing,
    and in the checkpointing modes the kept latent and the latent handed on to the next block."""
    crosses, hands_on = cfg.crosses(projection, layer), cfg.crosses(projection, layer + 1)
    if cfg.lax_latent != "output" and cfg.uses_lax:
        raise ValueError("activation counts model model.lax_latent output only")
    handed_on = r * a if hands_on else 0
    if mode == "block":
        return handed_on
    if mode == "lowrank":  # the kept matmul output, and the handed-on latent where it is another tensor
        return r * a + (handed_on if crosses or activation else 0)
    saved = r * a * (2 if activation else 1)  # B's input (and the activation's input)
    if crosses and cfg.lax_norm:
        saved += r * a + 2 * a  # the LayerNorm's input h + G(z), its mean and 1/std (CPU: activation dtype)
    if crosses and cfg.lax_gate == "tensor":
        saved += 2 * r * a  # the batched matmuls' copies of the folded latent and of C0 Z
    return saved


# --- transformers exports (megatron_lax/hub/) ------------------------------------------------------
# What an exported modeling file copies from this file, as it is here, for every format: the gates, the
# crossing and the factored layer (a format file's own HF_SOURCE adds what its class needs beside it).
HF_SOURCE = ("Latents", "ACTIVATIONS", "IdentityGate", "LinearGate", "DenseGate", "balanced_factors", "TensorGate",
             "GATES", "DenseLinear", "lowrank_factor_std", "kaiming_std", "kaiming_factor_stds", "LatentLinear",
             "LowRankLinear", "bias_init_rule")
