"""Tensor-train (TT-matrix) linear layers with inter- and intra-layer LaX (the paper's section 3.2).

W (d_out x d_in) is a chain of n cores C_j (r_j x d_j x r_{j+1}), r_0 = r_n = 1, over the modes
(d_0..d_{k-1}) of the input and (d_k..d_{n-1}) of the output, k = n / 2:

    W[(o_k..o_{n-1}), (i_0..i_{k-1})] = C_0[:, i_0, :] C_1[:, i_1, :] ... C_{n-1}[:, o_{n-1}, :]

The layer never builds W. It contracts x with the input cores one mode at a time (encode), which
leaves a latent of width r_k, the TT rank, and then expands it through the output cores (decode):
per token 2 sum_j r_j d_j r_{j+1} prod(modes still to contract) multiply-adds, O(d r) as for SVD.
The latent of width r_k is where inter-layer LaX crosses, exactly as for SVD and CoLA.

Intra-layer LaX: the partial contractions of the input cores are carried over to the mirrored
step of the output cores as residuals (left partial after core k-2-i -> right partial after core
k+i). With symmetric shapes they add directly; otherwise (or with a tensor gate) a two-core
TensorGate maps the folded partial (modes x rank) onto the other's shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from .base import ROLE_NAMES, Format
from .lowrank import IdentityGate, LatentLinear, TensorGate, bias_init_rule, kaiming_std, latent_saved_bytes


def tt_ranks(dims: list[int], rank: int) -> list[int]:
    """[1, r_1, ..., r_{n-1}, 1]: every inner rank is `rank` clipped to the largest rank a TT can
    have there, min(prod(dims[:j]), prod(dims[j:])). The middle rank r_k is the latent width."""
    return [1] + [min(rank, math.prod(dims[:j]), math.prod(dims[j:])) for j in range(1, len(dims))] + [1]


def official_rank(dims: list[int]) -> int:
    """The TT rank the official LaX code gives a layer whose rank its config leaves unset (its ViT MLPs):
    TensorLy's `same` rule, written out here. Every inner rank is proportional to the mean of the two
    modes it joins, r_j = f (d_{j-1} + d_j) / 2, with f the positive root of the quadratic that gives
    the unclipped train as many parameters as the dense matrix; each is rounded and then clipped to the
    largest a TT can have there. At four cores the clipping leaves only the middle rank free, so this
    returns it (ViT-B fc1 32,24|48,64: 158; fc2 48,64|32,24: 159, or 156 at Table 13's 48,64|24,32)."""
    means = [(a + b) / 2 for a, b in zip(dims, dims[1:])]
    quadratic = sum(means[j - 1] * dims[j] * means[j] for j in range(1, len(dims) - 1))
    linear = dims[0] * means[0] + dims[-1] * means[-1]
    f = (-linear + math.sqrt(linear ** 2 + 4 * quadratic * math.prod(dims))) / (2 * quadratic)
    k = len(dims) // 2
    return tt_ranks(dims, max(round(f * means[k - 1]), 1))[k]


def intra_shapes(in_dims: list[int], out_dims: list[int], ranks: list[int]) -> list[tuple[tuple, tuple]]:
    """For each intra-layer pathway i, the (modes, rank) shape of the left partial it takes and of
    the right partial it is added to."""
    k = len(in_dims)
    pairs = []
    for i in range(k - 1):
        left = k - 2 - i  # the left partial after core `left`
        src = (math.prod(in_dims[left + 1:]), ranks[left + 1])
        dst = (math.prod(out_dims[:i + 1]), ranks[k + i + 1])
        pairs.append((src, dst))
    return pairs


def tt_parameters(in_dims: list[int], out_dims: list[int], rank: int) -> int:
    dims, ranks = list(in_dims) + list(out_dims), tt_ranks(list(in_dims) + list(out_dims), rank)
    return sum(ranks[j] * d * ranks[j + 1] for j, d in enumerate(dims))


def intra_parameters(in_dims: list[int], out_dims: list[int], rank: int, gate: str) -> int:
    """The intra-layer gates' parameters: none where the shapes match and the gate is the identity."""
    ranks = tt_ranks(list(in_dims) + list(out_dims), rank)
    return sum(0 if (src == dst and gate == "identity") else src[0] * dst[0] + src[1] * dst[1]
               for src, dst in intra_shapes(list(in_dims), list(out_dims), ranks))


def tt_flops(in_dims: list[int], out_dims: list[int], rank: int) -> int:
    """Forward FLOPs per token of the contraction (2 per multiply-add)."""
    dims = list(in_dims) + list(out_dims)
    ranks, k, total = tt_ranks(dims, rank), len(in_dims), 0
    for j, d in enumerate(dims):
        remaining = math.prod(in_dims[j + 1:]) if j < k else math.prod(out_dims[:j - k])
        total += 2 * ranks[j] * d * ranks[j + 1] * remaining
    return total


class TTLinear(LatentLinear):
    """A TT-matrix linear layer. `intra`: None (no intra-layer LaX), `identity` (plain addition where
    the shapes match, a tensor gate where they do not) or `tensor` (a tensor gate everywhere)."""

    def __init__(self, in_dims: list[int], out_dims: list[int], rank: int, activation: Optional[str],
                 gate: Optional[str], gate_init: str = "identity", latent: str = "output", norm: bool = True,
                 bias: bool = False, intra: Optional[str] = None):
        in_dims, out_dims = [int(d) for d in in_dims], [int(d) for d in out_dims]
        if len(in_dims) != len(out_dims):
            raise ValueError(f"a TT layer needs as many input as output modes, got {in_dims} and {out_dims}")
        self.in_dims, self.out_dims = in_dims, out_dims
        self.ranks = tt_ranks(in_dims + out_dims, rank)
        self.k = len(in_dims)
        super().__init__(math.prod(in_dims), math.prod(out_dims), self.ranks[self.k], activation, gate, gate_init,
                         latent, norm)
        dims = in_dims + out_dims
        self.cores = nn.ParameterList(nn.Parameter(torch.empty(self.ranks[j], d, self.ranks[j + 1]))
                                      for j, d in enumerate(dims))
        self.bias = nn.Parameter(torch.empty(self.d_out)) if bias else None
        self.intra_gates = None
        if intra:
            self.intra_gates = nn.ModuleList(
                IdentityGate(0) if (src == dst and intra == "identity") else TensorGate(in_shape=src, out_shape=dst)
                for src, dst in intra_shapes(in_dims, out_dims, self.ranks))

    def encode(self, x, partials: Optional[list] = None):
        """Contracts the input modes one core at a time: (N, d_j, ..., r_j) -> (N, ..., r_{j+1})."""
        n = math.prod(x.shape[:-1])  # explicit sizes throughout: a batch may be empty (padded validation)
        state = x.reshape(n, *self.in_dims, 1)
        for j in range(self.k):
            core, (r, d, r_next) = self.cores[j], self.cores[j].shape
            rest = state.shape[2:-1]
            flat = state.reshape(n, d, math.prod(rest), r).transpose(1, 2).reshape(n * math.prod(rest), d * r)
            state = (flat @ core.permute(1, 0, 2).reshape(d * r, r_next)).reshape(n, *rest, r_next)
            if partials is not None and j < self.k - 1:
                partials.append(state.reshape(n, math.prod(rest) * r_next))
        return state.reshape(*x.shape[:-1], self.rank)

    def kept_matmul(self) -> tuple[int, int]:
        """What low-rank recompute keeps of this projection: the output of encode's last contraction,
        the latent of width r_k, named by that matmul's (input width d_{k-1} r_{k-1}, output width r_k).
        The partial contractions before it (wider than the latent) are recomputed."""
        return self.in_dims[-1] * self.ranks[self.k - 1], self.rank

    def decode(self, z, partials: Optional[list] = None):
        """Expands the latent through the output cores: (N, P, r_j) -> (N, P d_j, r_{j+1}), adding
        the mirrored left partial after each inner step when intra-layer LaX is on."""
        n = math.prod(z.shape[:-1])
        state = z.reshape(n, 1, self.rank)
        for i, j in enumerate(range(self.k, 2 * self.k)):
            core, (r, d, r_next) = self.cores[j], self.cores[j].shape
            modes = state.shape[1] * d
            state = (state.reshape(n * state.shape[1], r) @ core.reshape(r, d * r_next)).reshape(n, modes, r_next)
            if partials and j < 2 * self.k - 1:
                state = state + self.intra_gates[i](partials[self.k - 2 - i]).reshape(state.shape)
        y = state.reshape(*z.shape[:-1], self.d_out)
        return y + self.bias if self.bias is not None else y

    def forward(self, x, prev_latent=None):
        partials = [] if self.intra_gates is not None else None
        h = self.encode(x, partials)
        z = self.cross(h, prev_latent)
        return self.decode(z, partials), self.handed_on(h, z)

    def init_rules(self, at: str, init: str, init_std: float) -> dict[str, tuple[str, float]]:
        """Each core N(0, s^2) with s chosen so that W's entries have std sigma: Var(W) =
        s^(2n) prod(r_1..r_{n-1}), so s = (sigma^2 / prod r)^(1 / 2n). sigma is a dense layer's
        init_std (`matched`) or (d_in + d_out)^(-1/2) (`cola`, as the CoLA factors' product).
        `kaiming`: the official LaX ViT code's, each core Kaiming-normal (ReLU gain) over PyTorch's
        fan-in of the core as that code stores it, without the boundary ranks of 1 (d_0 x r_1 first,
        r_{n-1} x d_{n-1} last): the product of its dimensions after the first."""
        n = len(self.cores)
        if init == "kaiming":
            # the cores' shapes from the modes and ranks: ZeRO-3 leaves the parameters themselves empty
            shapes = [[self.ranks[j], d, self.ranks[j + 1]] for j, d in enumerate(self.in_dims + self.out_dims)]
            shapes[0], shapes[-1] = shapes[0][1:], shapes[-1][:-1]
            rules = {f"{at}cores.{j}": ("normal", kaiming_std(math.prod(shape[1:]))) for j, shape in enumerate(shapes)}
        else:
            sigma = (self.d_in + self.d_out) ** -0.5 if init == "cola" else init_std
            s = (sigma ** 2 / math.prod(self.ranks[1:-1])) ** (1 / (2 * n))
            rules = {f"{at}cores.{j}": ("normal", s) for j in range(n)}
        if self.bias is not None:
            rules[f"{at}bias"] = bias_init_rule(init)
        return rules


# --- the format (registered in formats.py) -------------------------------------------------------

@dataclass
class TensorTrainFields:
    lax_intra_modules: list = field(default_factory=list)  # tt: projections with intra-layer LaX
    lax_intra_gate: str = "identity"  # tt intra-layer: identity (tensor where shapes differ) | tensor
    tt_attn_dims: list = field(default_factory=list)  # tt: input then output modes of q, k, v, o (Table 13)
    tt_fc1_dims: list = field(default_factory=list)  # tt: the MLP's input projections (ViT fc1)
    tt_fc2_dims: list = field(default_factory=list)  # tt: the MLP's output projection (ViT fc2)


MODES_FIELD = {"attn": "tt_attn_dims", "mlp": "tt_fc1_dims", "mlp_out": "tt_fc2_dims"}  # by ModelConfig.role_of


def modes_of(cfg, projection: str) -> tuple[list[int], list[int]]:
    """(input modes, output modes) of a projection: the first and second half of its tt_*_dims."""
    dims = [int(d) for d in getattr(cfg, MODES_FIELD[cfg.role_of(projection)])]
    return dims[:len(dims) // 2], dims[len(dims) // 2:]


class TensorTrain(Format):
    name, label, fields = "tt", "Tensor Train", TensorTrainFields
    export = "transformers"  # hub/ copies this class (and HF_SOURCE) into a transformers export

    def validate(self, m, shapes) -> None:
        unknown = [p for p in m.lax_intra_modules if p not in shapes and p != "all"]
        if unknown:
            raise ValueError(f"model.lax_intra_modules has unknown projections {unknown} (known for {m.arch}: all, "
                             f"{', '.join(shapes)})")
        if m.lax_intra_gate not in ("identity", "tensor"):
            raise ValueError(f"model.lax_intra_gate {m.lax_intra_gate!r} is unknown (identity or tensor)")
        for projection, (d_in, d_out) in shapes.items():
            key, dims = MODES_FIELD[m.role_of(projection)], [int(d) for d in getattr(m, MODES_FIELD[m.role_of(projection)])]
            if not dims or len(dims) % 2:
                raise ValueError(f"model.{key} must list an even number of modes (input then output), got {dims}")
            modes_in, modes_out = modes_of(m, projection)
            if math.prod(modes_in) != d_in or math.prod(modes_out) != d_out:
                raise ValueError(f"model.{key} {dims}: input modes must multiply to {d_in} and output modes to {d_out}")
        for projection in shapes:
            kind = ROLE_NAMES[m.role_of(projection)]
            if m.rank_of(projection) <= 0:
                raise ValueError(f"model.method tt needs a positive {kind} TT rank (model.rank), got "
                                 f"{m.rank_of(projection)}")

    def validate_unused(self, m) -> None:
        if m.lax_intra_modules:
            raise ValueError("model.lax_intra_modules (intra-layer LaX) needs model.method tt")

    def intra(self, cfg, projection: str) -> bool:
        return "all" in cfg.lax_intra_modules or projection in cfg.lax_intra_modules

    def build(self, cfg, projection, d_in, d_out, bias, activation, crossing):
        intra = cfg.lax_intra_gate if self.intra(cfg, projection) else None
        return TTLinear(*modes_of(cfg, projection), cfg.rank_of(projection), None, intra=intra, bias=bias, **crossing)

    def count(self, cfg, projection, d_in, d_out):
        r, modes = cfg.rank_of(projection), modes_of(cfg, projection)
        params, flops = tt_parameters(*modes, r), tt_flops(*modes, r)
        if self.intra(cfg, projection):
            params += intra_parameters(*modes, r, cfg.lax_intra_gate)
        return params, flops, tt_ranks(modes[0] + modes[1], r)[len(modes[0])]

    def saved_bytes(self, cfg, projection, d_in, d_out, layer, mode, act_bytes):
        """With checkpointing off, the input of every core's matmul (the transposed copy of x for the
        first core, each partial contraction after it, each partial expansion before the last output
        core) plus the latent part (lowrank.latent_saved_bytes); intra-layer LaX is not modelled."""
        if self.intra(cfg, projection):
            raise ValueError("activation counts do not model intra-layer LaX (model.lax_intra_modules)")
        (in_dims, out_dims), a = modes_of(cfg, projection), act_bytes
        ranks, k = tt_ranks(in_dims + out_dims, cfg.rank_of(projection)), len(in_dims)
        latent = latent_saved_bytes(cfg, ranks[k], layer, projection, False, mode, a)
        if mode != "none":
            return latent
        copied_input = in_dims[0] > 1 and math.prod(in_dims[1:]) > 1
        encode = (math.prod(in_dims) if copied_input else 0) + \
            sum(math.prod(in_dims[j:]) * ranks[j] for j in range(1, k))
        decode = sum(math.prod(out_dims[:i]) * ranks[k + i] for i in range(1, k))
        return latent + a * (encode + decode)

    def kept_flops(self, cfg, projection, d_in, d_out):
        """encode's last contraction (TTLinear.kept_matmul): one (d_{k-1} r_{k-1}) x r_k matmul a token."""
        in_dims, out_dims = modes_of(cfg, projection)
        ranks, k = tt_ranks(in_dims + out_dims, cfg.rank_of(projection)), len(in_dims)
        return 2 * in_dims[-1] * ranks[k - 1] * ranks[k]

    def vit_overrides(self, scale, gate: str) -> dict:
        """Its three TT ranks and the official fc2 modes; with LaX, intra-layer LaX on q, k, v, o."""
        attn, fc1, fc2 = scale.tt_ranks
        overrides = {"model.attn_rank": str(attn), "model.mlp_rank": str(fc1), "model.mlp_out_rank": str(fc2),
                     "model.tt_fc2_dims": scale.fc2_modes}
        if gate != "none":
            overrides["model.lax_intra_modules"] = "q,k,v,o"
        return overrides

    def describe(self, cfg) -> str:
        label = super().describe(cfg)
        return label + (f" + intra-layer LaX on {','.join(cfg.lax_intra_modules)}" if cfg.lax_intra_modules else "")


# What a transformers export's modeling file copies from here beside the TensorTrain class (megatron_lax/hub/).
HF_SOURCE = ("tt_ranks", "intra_shapes", "TTLinear", "TensorTrainFields", "MODES_FIELD", "modes_of")
