"""A LaX LLaMA (dense, SVD or CoLA projections, LaX gates, LaX-LoRA adapters) as a transformers model.

This module is the source of the `modeling_megatron_lax.py` that `python -m megatron_lax.export`
writes into a Hugging Face folder: the export keeps everything outside the `megatron_lax` section
below as it is and writes, in place of that section's imports, the source of the package objects it
names (the format's layers, the gates, RMSNorm and rotary embeddings), so the written file needs only
torch and transformers and computes with the very code the training model runs. Parameter names
are the training model's under `model.` (the LM head stays `lm_head`).

A LaX projection of block i > 0 takes the latent that the same-named projection of block i - 1
handed on, so the blocks pass a dict of latents alongside the hidden states; the latents cross
blocks at one position, never positions, so only keys and values are cached (transformers' Cache).
"""
from __future__ import annotations

import math  # noqa: F401  (the written-out layers use it)
from dataclasses import dataclass, field  # noqa: F401  (and the formats' fields)
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# --- megatron_lax: the export writes these objects' source here ---
from ..method.base import ProjectionRules
from ..method.formats import FORMATS
from ..method.lowrank import Latents
from ..models.llama import RMSNorm, apply_rotary, rotary_tables
from ..models.lora import LoraLinear
# --- the transformers model ---

ATTENTION_PROJECTIONS = ("q", "k", "v", "o")
# transformers 5 calls the key/value cache `cache`; 4.x called it `past_key_values`
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class MegatronLaxLlamaConfig(ProjectionRules, PretrainedConfig):
    """LLaMA shapes under transformers' names; the low-rank format, its ranks, LaX and LaX-LoRA under
    megatron_lax's (`lowrank_format`: dense | svd | cola)."""

    model_type = "megatron_lax_llama"

    def __init__(self, vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=None, max_position_embeddings=2048, rms_norm_eps=1e-6,
                 rope_theta=10000.0, lowrank_format="dense", rank=0, attn_rank=None, mlp_rank=None,
                 mlp_out_rank=None, only_latent_act=False, lax_gate="none", lax_modules=("all",), lax_norm=True,
                 lax_latent="output", lax_gate_init="identity", lora_rank=0, lora_alpha=0.0, lora_dropout=0.0,
                 lora_targets=(), lora_lax_gate="none", lora_lax_norm=True, lora_lax_latent="output",
                 use_cache=True, tie_word_embeddings=False, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.max_position_embeddings, self.rms_norm_eps, self.rope_theta = max_position_embeddings, rms_norm_eps, rope_theta
        self.lowrank_format, self.rank, self.attn_rank = lowrank_format, rank, attn_rank
        self.mlp_rank, self.mlp_out_rank, self.only_latent_act = mlp_rank, mlp_out_rank, only_latent_act
        self.lax_gate, self.lax_modules, self.lax_norm = lax_gate, list(lax_modules), lax_norm
        self.lax_latent, self.lax_gate_init = lax_latent, lax_gate_init
        self.lora_rank, self.lora_alpha, self.lora_dropout = lora_rank, lora_alpha, lora_dropout
        self.lora_targets, self.lora_lax_gate = list(lora_targets), lora_lax_gate
        self.lora_lax_norm, self.lora_lax_latent = lora_lax_norm, lora_lax_latent
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    # the name the format's build function reads (ModelConfig's)
    @property
    def method(self) -> str:
        return self.lowrank_format


def build_projection(config: MegatronLaxLlamaConfig, projection: str, d_in: int, d_out: int, layer: int) -> nn.Module:
    """One projection of block `layer`: the format's layer (with its LaX crossing), wrapped in a LoRA
    adapter (with its own crossing) when the model carries LaX-LoRA adapters."""
    crossing = dict(gate=config.lax_gate if config.crosses(projection, layer) else None,
                    gate_init=config.lax_gate_init, latent=config.lax_latent, norm=config.lax_norm)
    linear = FORMATS[config.lowrank_format].build(config, projection, d_in, d_out, False, "silu", crossing)
    if config.lora_rank and projection in config.lora_targets:
        gate = config.lora_lax_gate if config.lora_lax_gate != "none" and layer > 0 else None
        linear = LoraLinear(linear, config.lora_rank, config.lora_alpha, config.lora_dropout, gate,
                            config.lora_lax_norm, config.lora_lax_latent)
    return linear


class MegatronLaxAttention(nn.Module):
    def __init__(self, config: MegatronLaxLlamaConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads = layer, config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        d, kv = config.hidden_size, config.num_key_value_heads * self.head_dim
        for name, d_out in (("q", d), ("k", kv), ("v", kv), ("o", d)):
            setattr(self, name, build_projection(config, name, d, d_out, layer))

    def forward(self, x, cos, sin, latents: Latents, out_latents: Latents, mask, cache):
        B, T, _ = x.shape
        heads = {}
        for name in ("q", "k", "v"):
            y, out_latents[name] = getattr(self, name)(x, latents.get(name))
            heads[name] = y.view(B, T, -1, self.head_dim)
        q, k = apply_rotary(heads["q"], cos, sin), apply_rotary(heads["k"], cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), heads["v"].transpose(1, 2)  # (B, heads, T, head_dim)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)
        if k.shape[1] != q.shape[1]:  # grouped-query attention
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        if mask is None:
            mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y, out_latents["o"] = self.o(mixed.transpose(1, 2).reshape(B, T, -1), latents.get("o"))
        return y


class MegatronLaxMLP(nn.Module):
    """down(silu(gate x) * up x); with `only_latent_act` (CoLA) the SiLU on the gate is dropped."""

    def __init__(self, config: MegatronLaxLlamaConfig, layer: int):
        super().__init__()
        self.only_latent_act = config.only_latent_act
        d, f = config.hidden_size, config.intermediate_size
        for name, d_in, d_out in (("gate", d, f), ("up", d, f), ("down", f, d)):
            setattr(self, name, build_projection(config, name, d_in, d_out, layer))

    def forward(self, x, latents: Latents, out_latents: Latents):
        g, out_latents["gate"] = self.gate(x, latents.get("gate"))
        u, out_latents["up"] = self.up(x, latents.get("up"))
        y, out_latents["down"] = self.down((g if self.only_latent_act else F.silu(g)) * u, latents.get("down"))
        return y


class MegatronLaxBlock(nn.Module):
    def __init__(self, config: MegatronLaxLlamaConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = MegatronLaxAttention(config, layer)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MegatronLaxMLP(config, layer)

    def forward(self, x, cos, sin, latents: Latents, mask=None, cache=None) -> tuple[torch.Tensor, Latents]:
        out_latents: Latents = {}
        x = x + self.attn(self.attn_norm(x), cos, sin, latents, out_latents, mask, cache)
        x = x + self.mlp(self.mlp_norm(x), latents, out_latents)
        return x, {k: v for k, v in out_latents.items() if v is not None}


class MegatronLaxPreTrainedModel(PreTrainedModel):
    config_class = MegatronLaxLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MegatronLaxBlock"]
    _supports_sdpa = True
    _supports_cache_class = True

    @torch.no_grad()
    def _init_weights(self, module):
        """Fresh weights (from_config); a trained model's come from its checkpoint. Gates and norms
        start at the identity."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, 0.02)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        else:
            for name, p in module.named_parameters(recurse=False):
                if p.dim() == 2 and p.shape[0] == p.shape[1] or name.startswith("core"):
                    nn.init.eye_(p)
                elif p.dim() == 1 and name in ("beta", "weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)


def attention_mask_4d(attention_mask: Optional[torch.Tensor], past: int, T: int, device) -> Optional[torch.Tensor]:
    """None (plain causal attention) when nothing is cached and nothing padded; else a boolean
    (B or 1, 1, T, past + T) mask: causal, without padded keys, and every position sees itself (a
    padding position then attends to itself alone rather than to nothing)."""
    if past == 0 and (attention_mask is None or bool(attention_mask.all())):
        return None
    total = past + T
    mask = torch.ones(T, total, dtype=torch.bool, device=device).tril(past)[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -total:].bool()
    own = torch.zeros(T, total, dtype=torch.bool, device=device)
    own[torch.arange(T), past + torch.arange(T)] = True
    return mask | own


class MegatronLaxModel(MegatronLaxPreTrainedModel):
    def __init__(self, config: MegatronLaxLlamaConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MegatronLaxBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, cache=None, **kwargs):
        past_key_values = cache if cache is not None else past_key_values
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            from transformers import DynamicCache
            past_key_values = DynamicCache()
        elif isinstance(past_key_values, (tuple, list)):  # the legacy tuple form (transformers 4.x)
            from transformers import DynamicCache
            past_key_values = DynamicCache.from_legacy_cache(past_key_values)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            if attention_mask is not None:  # left padding: positions count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=x.device)[None].expand(B, T)
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        cos, sin = rotary_tables(head_dim, int(position_ids.max()) + 1, self.config.rope_theta, x.device)
        cos, sin = cos[position_ids], sin[position_ids]
        mask = attention_mask_4d(attention_mask, past, T, x.device)
        latents: Latents = {}
        for block in self.layers:
            if self.gradient_checkpointing and self.training:
                x, latents = self._checkpointed(block, x, cos, sin, latents, mask)
            else:
                x, latents = block(x, cos, sin, latents, mask, past_key_values)
        return self.norm(x), past_key_values

    def _checkpointed(self, block, x, cos, sin, latents: Latents, mask):
        """A block under activation checkpointing, its latents passed as tensors (not a dict) so that
        gradients reach the previous block's latents whichever checkpoint transformers applies."""
        names, out_names = sorted(latents), []

        def run(x, *values):
            y, out = block(x, cos, sin, dict(zip(names, values)), mask, None)
            out_names[:] = sorted(out)
            return (y, *(out[k] for k in out_names))

        y, *values = self._gradient_checkpointing_func(run, x, *(latents[k] for k in names))
        return y, dict(zip(out_names, values))


class MegatronLaxForCausalLM(MegatronLaxPreTrainedModel, GenerationMixin):
    def __init__(self, config: MegatronLaxLlamaConfig):
        super().__init__(config)
        self.model = MegatronLaxModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
        """transformers' own where it has a generic one (4.46+); else the new tokens, the cache and the
        mask (4.45)."""
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        try:
            return super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask, **kwargs)
        except NotImplementedError:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            return {"input_ids": input_ids[:, past:], "past_key_values": past_key_values,
                    "attention_mask": attention_mask, "use_cache": kwargs.get("use_cache", True)}

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, cache=None, **kwargs):
        hidden, cache = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                                   cache)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:  # next-token loss, labels -100 unscored
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
