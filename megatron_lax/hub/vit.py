"""A LaX ViT (dense, SVD, CoLA or tensor-train projections, LaX gates) as a transformers image
classifier, with the image processor that gives it the evaluation view our `evaluate` gives it.

This module is the source of the `modeling_megatron_lax_vit.py` that `python -m megatron_lax.export`
writes for a ViT: as for the LLaMA (hub/llama.py), the export writes the source of the package objects
named in the `megatron_lax` section (the ViT's own blocks from vit.py, the format's layers, the
evaluation crop) in place of that section, so the file runs the training model's code with torch,
transformers and PIL only. The config keeps megatron_lax's ModelConfig names (dim, n_heads, method...),
which the copied blocks read; parameter names are the training model's.
"""
from __future__ import annotations

import math  # noqa: F401  (the written-out layers use it)
from dataclasses import dataclass, field  # noqa: F401  (and the formats' fields)
from typing import Optional  # noqa: F401

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image  # noqa: F401
from transformers import PretrainedConfig, PreTrainedModel
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.modeling_outputs import ImageClassifierOutput

# --- megatron_lax: the export writes these objects' source here ---
from ..method.base import ProjectionRules
from ..data.image_augment import center_crop_box, resize_box
from ..method.formats import FORMATS
from ..method.lowrank import Latents  # noqa: F401
from ..models.vit import MLP, Attention, Block, add_vit_modules, classify, projection_shapes, uses_mlp_norm, vit_linear  # noqa: F401
# --- the transformers model ---


class MegatronLaxViTConfig(ProjectionRules, PretrainedConfig):
    model_type = "megatron_lax_vit"

    def __init__(self, image_size=224, patch_size=16, in_channels=3, num_classes=0, dim=192, n_layers=12, n_heads=3,
                 ffn_dim=768, dropout=0.0, head_dropout=None, mlp_norm="auto", method="dense", rank=0, attn_rank=None,
                 mlp_rank=None, mlp_out_rank=None, lax_gate="none", lax_modules=("all",), lax_norm=True,
                 lax_latent="output", lax_gate_init="identity", lax_intra_modules=(), lax_intra_gate="identity",
                 tt_attn_dims=(), tt_fc1_dims=(), tt_fc2_dims=(), **kwargs):
        self.image_size, self.patch_size, self.in_channels, self.num_classes = image_size, patch_size, in_channels, num_classes
        self.dim, self.n_layers, self.n_heads, self.ffn_dim = dim, n_layers, n_heads, ffn_dim
        self.dropout, self.head_dropout, self.mlp_norm = dropout, head_dropout, mlp_norm
        self.method, self.rank, self.attn_rank, self.mlp_rank, self.mlp_out_rank = method, rank, attn_rank, mlp_rank, mlp_out_rank
        self.lax_gate, self.lax_modules, self.lax_norm = lax_gate, list(lax_modules), lax_norm
        self.lax_latent, self.lax_gate_init = lax_latent, lax_gate_init
        self.lax_intra_modules, self.lax_intra_gate = list(lax_intra_modules), lax_intra_gate
        self.tt_attn_dims, self.tt_fc1_dims, self.tt_fc2_dims = list(tt_attn_dims), list(tt_fc1_dims), list(tt_fc2_dims)
        super().__init__(**kwargs)


def format_of(cfg):
    return FORMATS[cfg.method]


def make_linear(cfg, projection: str, d_in: int, d_out: int, layer: int, bias: bool = False,
                activation: str = "silu") -> nn.Module:
    """Every projection of the copied blocks: the format's layer with its LaX crossing."""
    crossing = dict(gate=cfg.lax_gate if cfg.crosses(projection, layer) else None, gate_init=cfg.lax_gate_init,
                    latent=cfg.lax_latent, norm=cfg.lax_norm)
    module = FORMATS[cfg.method].build(cfg, projection, d_in, d_out, bias, activation, crossing)
    module.projection = projection
    return module


class MegatronLaxViTForImageClassification(PreTrainedModel):
    config_class = MegatronLaxViTConfig
    main_input_name = "pixel_values"
    _no_split_modules = ["Block"]

    def __init__(self, config: MegatronLaxViTConfig):
        super().__init__(config)
        add_vit_modules(self, config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        """Fresh weights (from_config); a trained model's come from its checkpoint."""
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.LayerNorm) or name == "beta":
                p.fill_(1.0 if name in ("weight", "beta") else 0.0)
            elif p.dim() == 2 and p.shape[0] == p.shape[1] or name.startswith("core"):
                nn.init.eye_(p)
            else:
                p.normal_(0.0, 0.02)

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None, **kwargs):
        logits = classify(self, pixel_values)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


class MegatronLaxImageProcessor(BaseImageProcessor):
    """The evaluation view of megatron_lax: the short side resized to image_size / crop_pct and the
    centre image_size square cropped, as one bicubic resample (an image already image_size square is
    left as it is); then scaled to [0, 1] and normalised."""

    model_input_names = ["pixel_values"]

    def __init__(self, image_size=224, crop_pct=0.875, image_mean=(0.5,), image_std=(0.5,), mode="RGB", **kwargs):
        super().__init__(**kwargs)
        self.image_size, self.crop_pct, self.mode = image_size, crop_pct, mode
        self.image_mean, self.image_std = list(image_mean), list(image_std)

    def view(self, image) -> np.ndarray:
        """One image (PIL, or an array) -> uint8 (image_size, image_size, channels)."""
        image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        image, size = image.convert(self.mode), self.image_size
        if image.size != (size, size):
            image = resize_box(image, center_crop_box(*image.size, size, self.crop_pct), size)
        return np.asarray(image).reshape(size, size, -1)

    def preprocess(self, images, return_tensors=None, **kwargs) -> BatchFeature:
        images = images if isinstance(images, (list, tuple)) else [images]
        pixels = torch.from_numpy(np.stack([self.view(image) for image in images])).permute(0, 3, 1, 2).float() / 255
        mean, std = torch.tensor(self.image_mean).view(1, -1, 1, 1), torch.tensor(self.image_std).view(1, -1, 1, 1)
        return BatchFeature({"pixel_values": (pixels - mean) / std}, tensor_type=return_tensors)
