"""A LLaMA decoder whose linear layers can be low-rank (SVD: B A x, CoLA: B silu(A x)) and boosted
by LaX (Latent Crossing): for block i > 0 a projection computes

    z_i = LN(A_i x_i + G(z_{i-1}))      (CoLA: z_i = silu(z_i))      y_i = B_i z_i

where z_{i-1} is the latent of the same-named projection (q->q, ..., down->down) of block i-1.
Blocks therefore take and return a dict of latents alongside the residual stream. Which latent a
projection hands on is `model.lax_latent`: `output` (z_i after the sum, LayerNorm and activation; the
official LaX code, recursive) or `projection` (h_i = A_i x_i, the paper's equations 2-5).

Parameters get their initial values from `init_rules` through method/init.py's `init_weights`, one
seeded generator per parameter name, so a model has the same weights however it is built or sharded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..method.formats import format_of, make_linear, projection_counts, projection_saved_bytes
from ..method.init import init_weights, module_init_rules
from ..method.lowrank import DenseLinear, Latents
from .base import Family, memory_gb  # noqa: F401 (memory_gb: the benchmarks' import)

try:  # optional: used only on CUDA with half-precision tensors
    import flash_attn
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn = flash_attn_func = None

# flash-attn registers its kernels as torch custom ops from 2.6.0 on; older versions break the graph,
# an error under train.compile's fullgraph: compiled blocks then use SDPA (FlashAttention-2 for bf16 too).
FLASH_ATTN_COMPILES = flash_attn is not None and tuple(int(p) for p in flash_attn.__version__.split(".")[:2]) >= (2, 6)


def flash_attn_usable(q: torch.Tensor, requested: bool) -> bool:
    if not (requested and flash_attn_func is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)):
        return False
    return FLASH_ATTN_COMPILES or not torch.compiler.is_compiling()

# --- LLaMA ----------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotary_tables(head_dim: int, length: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, (length, head_dim), always fp32. Computed on every forward (a few KB of work)
    rather than stored as buffers, which bf16 casts of the model (FSDP2 bf16-pure, DeepSpeed bf16)
    would round, and which a meta-device build would leave empty."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (T, head_dim), rotate-half layout
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """x: (B, T, H, D); cos, sin: (T, D), or (B, T, D) for per-row positions (left-padded
    generation); rotate-half convention (as Hugging Face LLaMA)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = (cos[:, :, None, :], sin[:, :, None, :]) if cos.dim() == 3 else (cos[None, :, None, :],
                                                                                 sin[None, :, None, :])
    return (x.float() * cos + rotated.float() * sin).type_as(x)


def attention(q, k, v, use_flash: bool):
    """Causal attention on (B, T, H, D) tensors; k and v may have fewer heads (grouped-query)."""
    if flash_attn_usable(q, use_flash):
        return flash_attn_func(q, k, v, causal=True)
    if k.shape[2] != q.shape[2]:
        k, v = (t.repeat_interleave(q.shape[2] // k.shape[2], dim=2) for t in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


class KVCache:
    """Keys and values of every block for incremental decoding, preallocated for `capacity`
    positions, plus which key positions hold real tokens (left padding does not). LaX latents need
    no cache: they cross blocks at the same position, never positions."""

    def __init__(self, cfg, batch: int, capacity: int, device, dtype):
        shape = (batch, capacity, cfg.n_kv_heads or cfg.n_heads, cfg.dim // cfg.n_heads)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0  # positions filled

    def reorder(self, rows: torch.Tensor) -> None:
        """Keeps rows `rows` (beam search: each surviving beam's parent)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.valid = self.valid[rows]


class Attention(nn.Module):
    def __init__(self, cfg, layer: int):
        super().__init__()
        self.n_heads, self.head_dim, self.use_flash = cfg.n_heads, cfg.dim // cfg.n_heads, cfg.flash_attn
        self.n_kv_heads, self.layer = cfg.n_kv_heads or cfg.n_heads, layer
        for name in ("q", "o"):
            setattr(self, name, make_linear(cfg, name, cfg.dim, cfg.dim, layer))
        for name in ("k", "v"):  # grouped-query attention: n_kv_heads heads, each shared by n_heads / n_kv_heads
            setattr(self, name, make_linear(cfg, name, cfg.dim, self.n_kv_heads * self.head_dim, layer))

    def forward(self, x, cos, sin, latents: Latents, out_latents: Latents, cache: Optional[KVCache] = None):
        B, T, _ = x.shape
        heads = {}
        for name in ("q", "k", "v"):
            y, out_latents[name] = getattr(self, name)(x, latents.get(name))
            heads[name] = y.view(B, T, -1, self.head_dim)
        q, k, v = apply_rotary(heads["q"], cos, sin), apply_rotary(heads["k"], cos, sin), heads["v"]
        if cache is None:
            mixed = attention(q, k, v, self.use_flash)
        else:
            mixed = cached_attention(q, k, v, cache, self.layer, self.n_heads // self.n_kv_heads)
        y, out_latents["o"] = self.o(mixed.reshape(B, T, -1), latents.get("o"))
        return y


def cached_attention(q, k, v, cache: KVCache, layer: int, group: int):
    """Writes k, v at the cache's next positions and attends q to every valid key up to its own
    position. The mask comes from cache.valid, so left padding is never attended to."""
    start, T = cache.length, q.shape[1]
    cache.keys[layer][:, start:start + T] = k
    cache.values[layer][:, start:start + T] = v
    keys, values = cache.keys[layer][:, :start + T], cache.values[layer][:, :start + T]
    if group > 1:
        keys, values = keys.repeat_interleave(group, dim=2), values.repeat_interleave(group, dim=2)
    causal = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(start)
    mask = causal[None, None] & cache.valid[:, None, None, :start + T]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask)
    return out.transpose(1, 2)


class SwiGLU(nn.Module):
    """down(silu(gate x) * up x). With `model.only_latent_act` (CoLA only; CoLA's `only_lr_act`, which
    its 350M-7B configs use) the SiLU on the gate is dropped: down(gate x * up x), where each CoLA
    layer already applies its latent SiLU."""

    def __init__(self, cfg, layer: int):
        super().__init__()
        self.act = (lambda g: g) if cfg.only_latent_act else F.silu
        self.gate = make_linear(cfg, "gate", cfg.dim, cfg.ffn_dim, layer)
        self.up = make_linear(cfg, "up", cfg.dim, cfg.ffn_dim, layer)
        self.down = make_linear(cfg, "down", cfg.ffn_dim, cfg.dim, layer)

    def forward(self, x, latents: Latents, out_latents: Latents):
        g, out_latents["gate"] = self.gate(x, latents.get("gate"))
        u, out_latents["up"] = self.up(x, latents.get("up"))
        y, out_latents["down"] = self.down(self.act(g) * u, latents.get("down"))
        return y


class Block(nn.Module):
    def __init__(self, cfg, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg, layer)

    def forward(self, x, cos, sin, latents: Latents, cache: Optional[KVCache] = None) -> tuple[torch.Tensor, Latents]:
        out_latents: Latents = {}
        x = x + self.attn(self.attn_norm(x), cos, sin, latents, out_latents, cache)
        x = x + self.mlp(self.mlp_norm(x), latents, out_latents)
        return x, {k: v for k, v in out_latents.items() if v is not None}


class LlamaLax(nn.Module):
    """init_seed: initialise with init_weights(model, init_seed); None leaves the values to the caller
    (engines that build on the meta device or partitioned, and then call init_weights themselves)."""

    def __init__(self, cfg, init_seed: Optional[int] = 0):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved (from the tokenizer) before building the model")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if init_seed is not None and not self.embed.weight.is_meta:
            init_weights(self, init_seed)

    def weight_init_rules(self) -> dict[str, tuple[str, float]]:
        return init_rules(self, self.cfg)

    def forward(self, tokens: torch.Tensor, cache: Optional[KVCache] = None,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens: (B, T) int64 -> logits (B, T, vocab). Incremental decoding passes a KVCache (whose
        `valid` already marks these T positions) and each token's rotary position, (B, T)."""
        head_dim = self.cfg.dim // self.cfg.n_heads
        if positions is None:
            cos, sin = rotary_tables(head_dim, tokens.shape[1], self.cfg.rope_theta, tokens.device)
        else:
            cos, sin = rotary_tables(head_dim, int(positions.max()) + 1, self.cfg.rope_theta, tokens.device)
            cos, sin = cos[positions], sin[positions]
        x = self.embed(tokens)
        latents: Latents = {}
        for block in self.layers:
            x, latents = block(x, cos, sin, latents, cache)
        if cache is not None:
            cache.length += tokens.shape[1]
        return self.lm_head(self.norm(x))


# --- initial values -------------------------------------------------------------------------------

def init_rules(model: nn.Module, cfg) -> dict[str, tuple[str, float]]:
    """(kind, std) for every parameter name: `normal` with that std, `ones`, `zeros` or `eye`."""
    rules = {}
    for prefix, module in model.named_modules():
        at = f"{prefix}." if prefix else ""
        if isinstance(module, (DenseLinear, nn.Embedding)) or prefix == "lm_head":
            rules[f"{at}weight"] = ("normal", cfg.init_std)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            rules[f"{at}weight"] = ("ones", 0.0)
            if getattr(module, "bias", None) is not None:
                rules[f"{at}bias"] = ("zeros", 0.0)
        else:
            rules.update(module_init_rules(module, at, cfg.resolved_lowrank_init, cfg.init_std))
    if cfg.residual_scale:
        scale_residual_branches(rules, cfg.n_layers, ("attn.o.", "mlp.down."))
    return rules


def scale_residual_branches(rules: dict, n_layers: int, last_layers: tuple) -> None:
    """`model.residual_scale` (GPT-2): the last layer of each residual branch starts with its std divided
    by sqrt(2 n_layers), so the residual stream's variance at init does not grow with depth. For a
    dense layer that is its weight; for a low-rank one the output-side factor B (the product B A then
    shrinks by the same factor)."""
    factor = (2 * n_layers) ** -0.5
    for name, (kind, std) in list(rules.items()):
        if kind == "normal" and any(f".{last}weight" in f".{name}" or f".{last}B.weight" in f".{name}"
                                    for last in last_layers):
            rules[name] = (kind, std * factor)


def token_nll(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100):
    """Summed next-token NLL and the number of scored targets (targets == ignore_index are padding)."""
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index, reduction="sum")
    return nll, (targets != ignore_index).sum()


# --- counts: parameters, memory, FLOPs ------------------------------------------------------------

def _projection_shapes(cfg):
    d, f = cfg.dim, cfg.ffn_dim
    kv = (cfg.n_kv_heads or cfg.n_heads) * (d // cfg.n_heads)
    return {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d), "gate": (d, f), "up": (d, f), "down": (f, d)}


def count_parameters(cfg) -> int:
    """Analytic parameter count (matches sum(p.numel()) of the built model; tested)."""
    total = 2 * cfg.vocab_size * cfg.dim + cfg.dim  # embedding, LM head, final norm
    for layer in range(cfg.n_layers):
        total += 2 * cfg.dim  # two RMSNorms
        total += sum(projection_counts(cfg, name, d_in, d_out, layer)[0]
                     for name, (d_in, d_out) in _projection_shapes(cfg).items())
    return total


def flops_per_token(cfg, seq_len: int) -> dict:
    """Forward and training (3x forward) FLOPs per token, counting each multiply-add as 2 FLOPs.

    Matmuls of every projection (dense: d_in d_out; low-rank: r (d_in + d_out)), the LM head, the
    attention scores and weighted sum (2 T d per layer per token, causal masking not discounted, as
    is the convention for MFU), and LaX's gate, add and LayerNorm. Elementwise activations are
    left out except LaX's, which are the method's only extra cost.
    """
    forward = 2 * cfg.dim * cfg.vocab_size  # LM head
    for layer in range(cfg.n_layers):
        forward += 2 * 2 * seq_len * cfg.dim  # QK^T and AV
        forward += sum(projection_counts(cfg, name, d_in, d_out, layer)[1]
                       for name, (d_in, d_out) in _projection_shapes(cfg).items())
    return {"forward": forward, "train": 3 * forward}


def block_saved_bytes(cfg, layer: int, mode: str, act_bytes: int, flash: bool) -> int:
    """Bytes per token block `layer` keeps for backward (the plan's activation count; checked against
    a real forward pass's saved tensors in the tests). `mode`: train.activation_checkpointing;
    `act_bytes`: 4 (fp32) or 2 (bf16 compute); `flash`: flash-attn (grouped-query keys and values
    kept once) or SDPA (repeated per head first). Each RMSNorm keeps its input in fp32, 1/rms
    and the normalised input before and after the weight; attention keeps the rotated q and k, v,
    its output (which o reads in place: both kernels lay it out token-major) and the log-sum-exp
    per head (fp32); the MLP keeps gate, act(gate), up and their
    product; each projection what its format says (method.formats.projection_saved_bytes)."""
    d, f, a = cfg.dim, cfg.ffn_dim, act_bytes
    projections = sum(projection_saved_bytes(cfg, name, d_in, d_out, layer, mode, a)
                      for name, (d_in, d_out) in _projection_shapes(cfg).items())
    if mode != "none":
        return a * d + projections  # the block's input, and what the projections keep
    kv = _projection_shapes(cfg)["k"][1] if flash else d  # SDPA repeats grouped-query keys and values
    norms = 2 * (4 * d * (1 if a == 4 else 2) + 4 + 2 * a * d)  # x.float() is x itself in fp32, two copies else
    attention = a * (2 * d + 2 * kv) + 4 * cfg.n_heads
    mlp = a * f * (3 if cfg.only_latent_act else 4)
    return norms + attention + mlp + projections


def activation_bytes(cfg, tokens: int, mode: str, act_bytes: int, flash: bool) -> int:
    """Bytes of activations one micro-batch of `tokens` tokens keeps for backward, every block, the
    final norm and the LM head's logits (act_bytes each; their fp32 copy and gradient in the loss are
    counted by the plan's workspace, not here)."""
    blocks = sum(block_saved_bytes(cfg, layer, mode, act_bytes, flash) for layer in range(cfg.n_layers))
    final_norm = 4 * cfg.dim + 4 + 2 * act_bytes * cfg.dim
    return tokens * (blocks + final_norm + act_bytes * cfg.vocab_size)


# --- the family (registered in models/__init__.py) ------------------------------------------------

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class LlamaFields:
    n_kv_heads: int = 0  # key/value heads (grouped-query attention); 0: n_heads
    rope_theta: float = 10000.0
    flash_attn: bool = True  # use flash-attn when importable and on CUDA; SDPA otherwise
    residual_scale: bool = False  # init std of the residual branches' last layer (o, down; low-rank: B) / sqrt(2 n_layers), as GPT-2


class Llama(Family):
    name, fields, projections = "llama", LlamaFields, PROJECTIONS
    task, uses_tokenizer, exports_to_huggingface = "language_modeling", True, True
    data_fields = ("vocab_size",)
    transformers_export = "llama"  # hub/llama.py

    def build(self, cfg, init_seed: Optional[int] = 0) -> nn.Module:
        return LlamaLax(cfg, init_seed)

    def new_cache(self, cfg, rows: int, capacity: int, device, dtype) -> KVCache:
        return KVCache(cfg, rows, capacity, device, dtype)

    def loss(self, outputs, targets):
        return token_nll(outputs, targets)

    def validate(self, m) -> None:
        if (m.dim // m.n_heads) % 2 != 0:
            raise ValueError(f"head dimension {m.dim // m.n_heads} must be even for rotary embeddings")
        if m.n_kv_heads < 0 or (m.n_kv_heads and m.n_heads % m.n_kv_heads):
            raise ValueError(f"model.n_kv_heads {m.n_kv_heads} must divide model.n_heads {m.n_heads} (0: n_heads)")
        if m.n_kv_heads and m.n_kv_heads != m.n_heads and format_of(m).lowrank:
            raise ValueError("model.n_kv_heads (grouped-query attention) is supported for dense models only")

    def count_parameters(self, cfg) -> int:
        return count_parameters(cfg)

    def flops(self, cfg, seq_len: int = 0) -> dict:
        return flops_per_token(cfg, seq_len)

    def activation_rows(self, cfg, seq_len: int, mode: str, act_bytes: int, flash: bool) -> dict[str, int]:
        """Bytes per sequence of a micro-batch, by what holds them: what it keeps for backward (every
        block, the final norm, the logits), the one block a checkpointed backward rematerialises, the
        loss's fp32 log-probabilities and their gradient, and the attention backward's workspace for
        one layer (the fp32 accumulator of dq and the softmax statistics; SDPA also the gradients of
        the grouped-query keys and values it repeated per head)."""
        a, T, d = act_bytes, seq_len, cfg.dim
        recompute = 0 if mode == "none" else T * max(block_saved_bytes(cfg, layer, "none", a, flash)
                                                    for layer in range(cfg.n_layers))
        kv = _projection_shapes(cfg)["k"][1]
        attention = T * (4 * d + 4 * cfg.n_heads + (0 if flash or kv == d else 2 * a * d))
        return {f"activations kept for backward (checkpointing {mode})": activation_bytes(cfg, T, mode, a, flash),
                "recomputed block in backward": recompute,
                "loss workspace (fp32 log-probs, gradient)": T * cfg.vocab_size * (4 + 4),
                f"attention backward workspace ({'flash-attn' if flash else 'SDPA'})": attention}

    def recompute_flops(self, cfg, mode: str, seq_len: int) -> float:
        """Extra forward FLOPs per token a checkpointed backward spends: every block again (`block`), or
        every block but the matmuls whose outputs low-rank recompute keeps (each format's kept_flops)."""
        if mode == "none":
            return 0.0
        blocks = flops_per_token(cfg, seq_len)["forward"] - 2 * cfg.dim * cfg.vocab_size
        if mode == "block":
            return blocks
        kept = sum(format_of(cfg).kept_flops(cfg, name, d_in, d_out)
                   for name, (d_in, d_out) in _projection_shapes(cfg).items())
        return blocks - cfg.n_layers * kept
