"""A Vision Transformer (ViT, Dosovitskiy et al.) whose projections can be dense, SVD, CoLA or
tensor-train, with LaX crossing latents q->q, k->k, v->v, o->o, fc1->fc1, fc2->fc2 between blocks
(the paper's section 4.1), built from the same method package as the LLaMA (megatron_lax/method).

Patch embedding (a stride-p convolution), a learned CLS token and position embeddings, pre-norm
blocks (LayerNorm, multi-head attention, LayerNorm, GELU MLP), a final LayerNorm and a linear head on
the CLS token. Projections carry biases, as in the ViT. CoLA's latent activation is the ViT's own
GELU (the official LaX ViT code). With `model.mlp_norm` on, the MLP normalises its hidden layer
before fc2, as the official LaX ViT code does for its low-rank models; that LayerNorm is what makes
the parameter counts of the paper's Table 1 come out (`auto`: on for low-rank methods only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..method.formats import format_of, make_linear, projection_counts
from ..method.init import init_weights, module_init_rules
from ..method.lowrank import LatentLinear, Latents
from .base import Family


def uses_mlp_norm(cfg) -> bool:
    return cfg.mlp_norm == "on" or (cfg.mlp_norm == "auto" and format_of(cfg).lowrank)


def projection_shapes(cfg) -> dict[str, tuple[int, int]]:
    d, f = cfg.dim, cfg.ffn_dim
    return {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "fc1": (d, f), "fc2": (f, d)}


def vit_linear(cfg, name: str, layer: int) -> nn.Module:
    d_in, d_out = projection_shapes(cfg)[name]
    return make_linear(cfg, name, d_in, d_out, layer, bias=True, activation="gelu")


class Attention(nn.Module):
    def __init__(self, cfg, layer: int):
        super().__init__()
        self.n_heads = cfg.n_heads
        for name in ("q", "k", "v", "o"):
            setattr(self, name, vit_linear(cfg, name, layer))

    def forward(self, x, latents: Latents, out_latents: Latents):
        B, T, D = x.shape
        heads = {}
        for name in ("q", "k", "v"):
            y, out_latents[name] = getattr(self, name)(x, latents.get(name))
            heads[name] = y.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)
        mixed = F.scaled_dot_product_attention(heads["q"], heads["k"], heads["v"])
        y, out_latents["o"] = self.o(mixed.transpose(1, 2).reshape(B, T, D), latents.get("o"))
        return y


class MLP(nn.Module):
    def __init__(self, cfg, layer: int):
        super().__init__()
        self.fc1 = vit_linear(cfg, "fc1", layer)
        self.norm = nn.LayerNorm(cfg.ffn_dim, eps=1e-6) if uses_mlp_norm(cfg) else nn.Identity()
        self.fc2 = vit_linear(cfg, "fc2", layer)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, latents: Latents, out_latents: Latents):
        h, out_latents["fc1"] = self.fc1(x, latents.get("fc1"))
        h = self.norm(self.dropout(F.gelu(h)))
        y, out_latents["fc2"] = self.fc2(h, latents.get("fc2"))
        return self.dropout(y)


class Block(nn.Module):
    def __init__(self, cfg, layer: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.mlp = MLP(cfg, layer)

    def forward(self, x, latents: Latents) -> tuple[torch.Tensor, Latents]:
        out_latents: Latents = {}
        x = x + self.attn(self.attn_norm(x), latents, out_latents)
        x = x + self.mlp(self.mlp_norm(x), latents, out_latents)
        return x, {k: v for k, v in out_latents.items() if v is not None}


class ViTLax(nn.Module):
    """images (B, C, H, W) -> logits (B, num_classes). init_seed as LlamaLax's."""

    def __init__(self, cfg, init_seed: Optional[int] = 0):
        super().__init__()
        if cfg.num_classes <= 0 or cfg.in_channels <= 0:
            raise ValueError("model.num_classes and model.in_channels must be resolved (from the data) first")
        self.cfg = cfg
        add_vit_modules(self, cfg)
        if init_seed is not None and not self.pos_embed.is_meta:
            init_weights(self, init_seed)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return classify(self, images)

    def no_weight_decay(self) -> set[str]:
        """The tensors of two or more dimensions that take no weight decay (optim.param_groups): the
        position embeddings and the CLS token, as timm's ViT and the official LaX code; the gates'
        matrices decay there, as every other matrix."""
        return {"pos_embed", "cls_token"}

    def weight_init_rules(self) -> dict[str, tuple[str, float]]:
        """The ViT's: weights N(0, init_std^2) (timm uses a truncated normal of the same std), biases
        zero, the CLS token N(0, 1e-6^2) as timm, LayerNorms at the identity; low-rank factors by
        `model.lowrank_init`."""
        cfg, rules, latent_prefixes = self.cfg, {}, []
        for prefix, module in self.named_modules():
            at = f"{prefix}." if prefix else ""
            if isinstance(module, LatentLinear):
                latent_prefixes.append(at)
            inside_latent = any(at.startswith(p) and at != p for p in latent_prefixes)
            if isinstance(module, (nn.Linear, nn.Conv2d)) and not inside_latent:
                rules[f"{at}weight"] = ("normal", cfg.init_std)
                if module.bias is not None:
                    rules[f"{at}bias"] = ("zeros", 0.0)
            elif isinstance(module, nn.LayerNorm):  # the crossings' LayerNorms too
                rules.update({f"{at}weight": ("ones", 0.0), f"{at}bias": ("zeros", 0.0)})
            else:
                rules.update(module_init_rules(module, at, cfg.resolved_lowrank_init, cfg.init_std))
        rules.update({"cls_token": ("normal", 1e-6), "pos_embed": ("normal", cfg.init_std)})
        return rules


def add_vit_modules(model: nn.Module, cfg) -> None:
    """The ViT's modules, set on `model` (ViTLax, and its transformers export in hub/vit.py); the values
    are left to the caller."""
    n_patches = (cfg.image_size // cfg.patch_size) ** 2
    model.patch_embed = nn.Conv2d(cfg.in_channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
    model.cls_token = nn.Parameter(torch.empty(1, 1, cfg.dim))
    model.pos_embed = nn.Parameter(torch.empty(1, n_patches + 1, cfg.dim))
    model.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
    model.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
    model.head_dropout = nn.Dropout(cfg.dropout if cfg.head_dropout is None else cfg.head_dropout)
    model.head = nn.Linear(cfg.dim, cfg.num_classes)


def classify(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The ViT's forward, images (B, C, H, W) -> logits, for ViTLax and its transformers export
    (hub/vit.py), which have the same modules."""
    images = images.to(model.patch_embed.weight.dtype)  # engines that cast the model (bf16) leave inputs
    x = model.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, D)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + model.pos_embed
    latents: Latents = {}
    for block in model.layers:
        x, latents = block(x, latents)
    return model.head(model.head_dropout(model.norm(x[:, 0])))


def classification_loss(logits: torch.Tensor, targets: torch.Tensor):
    """Summed cross-entropy and the number of images: targets are class indices (B,) or target
    distributions (B, classes) from label smoothing, mixup or cutmix."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    if targets.dtype.is_floating_point:
        loss = -(targets * log_probs).sum()
    else:
        loss = F.nll_loss(log_probs, targets, reduction="sum")
    return loss, torch.tensor(targets.shape[0], device=logits.device)


# --- counts: parameters and FLOPs (analytic; tested against the built model) -----------------------

def _counts(cfg, name: str, layer: int) -> tuple[int, int]:
    d_in, d_out = projection_shapes(cfg)[name]
    return projection_counts(cfg, name, d_in, d_out, layer, bias=True)


def count_parameters(cfg) -> int:
    n_patches = (cfg.image_size // cfg.patch_size) ** 2
    total = cfg.in_channels * cfg.patch_size ** 2 * cfg.dim + cfg.dim  # patch embedding
    total += cfg.dim + (n_patches + 1) * cfg.dim  # CLS token, positions
    total += 2 * cfg.dim + cfg.dim * cfg.num_classes + cfg.num_classes  # final norm, head
    for layer in range(cfg.n_layers):
        total += 4 * cfg.dim + (2 * cfg.ffn_dim if uses_mlp_norm(cfg) else 0)
        total += sum(_counts(cfg, name, layer)[0] for name in projection_shapes(cfg))
    return total


def flops_per_image(cfg) -> dict:
    """Forward and training (3x) FLOPs per image, 2 per multiply-add: patch embedding, every
    projection, attention scores and weighted sums, LaX crossings, the head."""
    tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
    per_token = 0
    for layer in range(cfg.n_layers):
        per_token += 2 * 2 * tokens * cfg.dim  # QK^T and AV
        per_token += sum(_counts(cfg, name, layer)[1] for name in projection_shapes(cfg))
    embed = 2 * cfg.in_channels * cfg.patch_size ** 2 * cfg.dim * (tokens - 1)
    forward = per_token * tokens + embed + 2 * cfg.dim * cfg.num_classes
    return {"forward": forward, "train": 3 * forward}


# --- the family (registered in models/__init__.py) ------------------------------------------------

@dataclass
class ViTFields:
    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 0  # 0: follow the data (1 for Fashion-MNIST, 3 for RGB folders)
    num_classes: int = 0  # 0: follow the data
    dropout: float = 0.0  # after the MLP's hidden layer and output, and before the head (Table 9: 0.1)
    head_dropout: Optional[float] = None  # before the head; None: model.dropout
    mlp_norm: str = "auto"  # LayerNorm on the MLP's hidden layer: auto (low-rank only, official code) | on | off


class ViT(Family):
    name, fields, projections = "vit", ViTFields, ("q", "k", "v", "o", "fc1", "fc2")
    task, uses_tokenizer, run_prefix = "image_classification", False, "vit_"
    data_fields = ("num_classes", "in_channels")
    transformers_export = "vit"  # hub/vit.py

    def build(self, cfg, init_seed: Optional[int] = 0) -> nn.Module:
        return ViTLax(cfg, init_seed)

    def loss(self, outputs, targets):
        return classification_loss(outputs, targets)

    def validate(self, m) -> None:
        if m.head_dropout is not None and not 0.0 <= m.head_dropout < 1.0:
            raise ValueError(f"model.head_dropout must lie in [0, 1), got {m.head_dropout}")
        if m.mlp_norm not in ("auto", "on", "off"):
            raise ValueError(f"model.mlp_norm {m.mlp_norm!r} is unknown (auto, on or off)")
        if m.image_size % m.patch_size:
            raise ValueError(f"model.image_size {m.image_size} is not a multiple of model.patch_size {m.patch_size}")

    def count_parameters(self, cfg) -> int:
        return count_parameters(cfg)

    def flops(self, cfg, seq_len: int = 0) -> dict:
        return flops_per_image(cfg)
