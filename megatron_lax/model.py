"""A LLaMA decoder whose linear layers can be low-rank (SVD: B A x, CoLA: B silu(A x)) and boosted
by LaX (Latent Crossing): for block i > 0 a projection computes

    z_i = LN(A_i x_i + G(z_{i-1}))      (CoLA: z_i = silu(z_i))      y_i = B_i z_i

where z_{i-1} is the latent of the same-named projection (q->q, ..., down->down) of block i-1.
Blocks therefore take and return a dict of latents alongside the residual stream.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig, PROJECTIONS

try:  # optional: used only on CUDA with half-precision tensors
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None

Latents = dict[str, torch.Tensor]


# --- LaX gates: map the previous block's latent into this block's latent space ------------------

class IdentityGate(nn.Module):
    def __init__(self, rank: int):
        super().__init__()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z


class LinearGate(nn.Module):
    """One trainable scalar; starts at 1 (the identity gate). Stored with shape (1,) because FSDP2
    shards parameters along dim 0."""

    def __init__(self, rank: int):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(1))

    def forward(self, z):
        return self.beta * z


class DenseGate(nn.Module):
    """An r x r linear map; starts as the identity."""

    def __init__(self, rank: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(rank))

    def forward(self, z):
        return F.linear(z, self.weight)


def balanced_factors(n: int) -> tuple[int, int]:
    """The factor pair (r0, r1), r0 <= r1, r0 * r1 = n, with r0 as close to sqrt(n) as possible."""
    r0 = int(math.isqrt(n))
    while n % r0:
        r0 -= 1
    return r0, n // r0


class TensorGate(nn.Module):
    """Folds the r-vector into an r0 x r1 matrix Z and returns C0 Z C1^T, i.e. (C0 kron C1) z:
    a Kronecker-factored r x r map with r0^2 + r1^2 parameters. Starts as the identity."""

    def __init__(self, rank: int):
        super().__init__()
        self.r0, self.r1 = balanced_factors(rank)
        self.core0 = nn.Parameter(torch.eye(self.r0))
        self.core1 = nn.Parameter(torch.eye(self.r1))

    def forward(self, z):
        folded = z.unflatten(-1, (self.r0, self.r1))
        out = torch.matmul(torch.matmul(self.core0, folded), self.core1.transpose(0, 1))
        return out.flatten(-2)


GATES = {"identity": IdentityGate, "linear": LinearGate, "dense": DenseGate, "tensor": TensorGate}


# --- linear layers ------------------------------------------------------------------------------

class DenseLinear(nn.Linear):
    """A plain bias-free linear with the low-rank layers' call signature."""

    def __init__(self, d_in, d_out, std):
        super().__init__(d_in, d_out, bias=False)
        nn.init.normal_(self.weight, std=std)

    def forward(self, x, prev_latent=None):
        return super().forward(x), None


class LowRankLinear(nn.Module):
    """y = B z with z = A x (svd) or silu(A x) (cola); with LaX, z also takes in the previous
    block's latent through a gate and a LayerNorm over the r latent features."""

    def __init__(self, d_in, d_out, rank, std, activation: bool, gate: Optional[str]):
        super().__init__()
        self.A = nn.Linear(d_in, rank, bias=False)
        self.B = nn.Linear(rank, d_out, bias=False)
        # Var(B A x)_j = r Var(A) Var(B) Var(x) d_in: equal factor stds of sqrt(std / sqrt(r))
        # give the product the variance std^2 of a dense layer's weights.
        factor_std = math.sqrt(std / math.sqrt(rank))
        nn.init.normal_(self.A.weight, std=factor_std)
        nn.init.normal_(self.B.weight, std=factor_std)
        self.activation = activation
        self.gate = GATES[gate](rank) if gate else None
        self.norm = nn.LayerNorm(rank) if gate else None

    def forward(self, x, prev_latent=None):
        z = self.A(x)
        if self.gate is not None:
            z = self.norm(z + self.gate(prev_latent))
        if self.activation:
            z = F.silu(z)
        return self.B(z), z


def make_linear(cfg: ModelConfig, projection: str, d_in: int, d_out: int, layer: int) -> nn.Module:
    """The one factory for every projection of every block."""
    if cfg.method == "dense":
        return DenseLinear(d_in, d_out, cfg.init_std)
    crosses = cfg.uses_lax and layer > 0 and projection in cfg.lax_modules
    return LowRankLinear(d_in, d_out, cfg.rank_of(projection), cfg.init_std,
                         activation=cfg.method == "cola", gate=cfg.lax_gate if crosses else None)


# --- LLaMA ----------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (T, head_dim), rotate-half layout
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """x: (B, T, H, D); rotate-half convention (as Hugging Face LLaMA)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x.float() * cos + rotated.float() * sin).type_as(x)


def attention(q, k, v, use_flash: bool):
    """Causal attention on (B, T, H, D) tensors."""
    if use_flash and flash_attn_func is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        return flash_attn_func(q, k, v, causal=True)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_heads, self.head_dim, self.use_flash = cfg.n_heads, cfg.dim // cfg.n_heads, cfg.flash_attn
        for name in ("q", "k", "v", "o"):
            setattr(self, name, make_linear(cfg, name, cfg.dim, cfg.dim, layer))

    def forward(self, x, cos, sin, latents: Latents, out_latents: Latents):
        B, T, _ = x.shape
        heads = {}
        for name in ("q", "k", "v"):
            y, out_latents[name] = getattr(self, name)(x, latents.get(name))
            heads[name] = y.view(B, T, self.n_heads, self.head_dim)
        q, k = apply_rotary(heads["q"], cos, sin), apply_rotary(heads["k"], cos, sin)
        mixed = attention(q, k, heads["v"], self.use_flash).reshape(B, T, -1)
        y, out_latents["o"] = self.o(mixed, latents.get("o"))
        return y


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.gate = make_linear(cfg, "gate", cfg.dim, cfg.ffn_dim, layer)
        self.up = make_linear(cfg, "up", cfg.dim, cfg.ffn_dim, layer)
        self.down = make_linear(cfg, "down", cfg.ffn_dim, cfg.dim, layer)

    def forward(self, x, latents: Latents, out_latents: Latents):
        g, out_latents["gate"] = self.gate(x, latents.get("gate"))
        u, out_latents["up"] = self.up(x, latents.get("up"))
        y, out_latents["down"] = self.down(F.silu(g) * u, latents.get("down"))
        return y


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg, layer)

    def forward(self, x, cos, sin, latents: Latents) -> tuple[torch.Tensor, Latents]:
        out_latents: Latents = {}
        x = x + self.attn(self.attn_norm(x), cos, sin, latents, out_latents)
        x = x + self.mlp(self.mlp_norm(x), latents, out_latents)
        return x, {k: v for k, v in out_latents.items() if v is not None}


class LlamaLax(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved (from the tokenizer) before building the model")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=cfg.init_std)
        cos, sin = rotary_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def reset_rotary(self):
        """Recompute the (non-persistent) rotary tables, e.g. after materialising from meta."""
        cos, sin = rotary_tables(self.cfg.dim // self.cfg.n_heads, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, T) int64 -> logits (B, T, vocab)."""
        T = tokens.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed(tokens)
        latents: Latents = {}
        for block in self.layers:
            x, latents = block(x, cos, sin, latents)
        return self.lm_head(self.norm(x))


def token_nll(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100):
    """Summed next-token NLL and the number of scored targets (targets == ignore_index are padding)."""
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index, reduction="sum")
    return nll, (targets != ignore_index).sum()


# --- counts: parameters, memory, FLOPs ------------------------------------------------------------

def _projection_shapes(cfg: ModelConfig):
    d, f = cfg.dim, cfg.ffn_dim
    return {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "gate": (d, f), "up": (d, f), "down": (f, d)}


def count_parameters(cfg: ModelConfig) -> int:
    """Analytic parameter count (matches sum(p.numel()) of the built model; tested)."""
    total = 2 * cfg.vocab_size * cfg.dim + cfg.dim  # embedding, LM head, final norm
    for layer in range(cfg.n_layers):
        total += 2 * cfg.dim  # two RMSNorms
        for name, (d_in, d_out) in _projection_shapes(cfg).items():
            if cfg.method == "dense":
                total += d_in * d_out
                continue
            r = cfg.rank_of(name)
            total += r * (d_in + d_out)
            if cfg.uses_lax and layer > 0 and name in cfg.lax_modules:
                total += 2 * r + _gate_parameters(cfg.lax_gate, r)
    return total


def _gate_parameters(gate: str, r: int) -> int:
    if gate == "linear":
        return 1
    if gate == "dense":
        return r * r
    if gate == "tensor":
        r0, r1 = balanced_factors(r)
        return r0 * r0 + r1 * r1
    return 0


def memory_gb(n_params: int) -> float:
    """The paper's Table 5 estimate: BF16 weights, gradients and two Adam states (8 bytes per
    parameter), activations excluded, in GiB."""
    return n_params * 8 / 2**30


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict:
    """Forward and training (3x forward) FLOPs per token, counting each multiply-add as 2 FLOPs.

    Matmuls of every projection (dense: d_in d_out; low-rank: r (d_in + d_out)), the LM head, the
    attention scores and weighted sum (2 T d per layer per token, causal masking not discounted, as
    is the convention for MFU), and LaX's gate, add and LayerNorm. Elementwise activations are
    left out except LaX's, which are the method's only extra cost.
    """
    forward = 2 * cfg.dim * cfg.vocab_size  # LM head
    for layer in range(cfg.n_layers):
        forward += 2 * 2 * seq_len * cfg.dim  # QK^T and AV
        for name, (d_in, d_out) in _projection_shapes(cfg).items():
            if cfg.method == "dense":
                forward += 2 * d_in * d_out
                continue
            r = cfg.rank_of(name)
            forward += 2 * r * (d_in + d_out)
            if cfg.uses_lax and layer > 0 and name in cfg.lax_modules:
                forward += _gate_flops(cfg.lax_gate, r) + r + 8 * r  # gate, add, LayerNorm
    return {"forward": forward, "train": 3 * forward}


def _gate_flops(gate: str, r: int) -> int:
    if gate == "linear":
        return r
    if gate == "dense":
        return 2 * r * r
    if gate == "tensor":
        r0, r1 = balanced_factors(r)
        return 2 * r * (r0 + r1)
    return 0
