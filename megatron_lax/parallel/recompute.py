"""Activation checkpointing, applied to an unmodified model's blocks (train.activation_checkpointing):

- `block`: keep each block's inputs, recompute the whole block in the backward pass;
- `lowrank` (CoLA-M): keep, besides the block's inputs (the residual stream and the LaX latents
  handed on from the previous block), the output of every matmul that makes a rank-r latent, and
  recompute the rest (norms, the up-projections B z, attention, the MLP's elementwise work, LaX's
  add, LayerNorm and activation). Each format says which matmul that is (`kept_matmul()` in its
  own file); a dense projection keeps nothing, so a dense model recomputes its blocks whole.

The kept matmuls are found by PyTorch's selective activation checkpointing, by their (input width,
output width), so the policy works the same in eager mode and under torch.compile.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)


def kept_matmuls(block: nn.Module) -> frozenset[tuple[int, int]]:
    """The (input width, output width) of every matmul low-rank recompute keeps in a block."""
    return frozenset(m.kept_matmul() for m in block.modules() if hasattr(m, "kept_matmul"))


def keep_latents_policy(kept: frozenset):
    def policy(ctx, func, *args, **kwargs):
        if func in MATMULS:
            mat1, mat2 = args[-2], args[-1]
            if (mat1.shape[-1], mat2.shape[-1]) in kept:
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE
    return policy


def checkpoint_block(block: nn.Module, mode: str) -> None:
    """Wraps one block's forward in place (parameter names, hence checkpoints, unchanged)."""
    context = {}
    if mode == "lowrank":
        policy = keep_latents_policy(kept_matmuls(block))
        context = {"context_fn": functools.partial(create_selective_checkpoint_contexts, policy)}
    block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False, **context)


def apply_activation_checkpointing(model: nn.Module, mode: str = "block") -> None:
    """Recompute each block's activations in the backward pass (`block` or `lowrank`; `none` does
    nothing). LaX latents are ordinary inputs and outputs of the checkpointed function, so they cross
    block boundaries as usual."""
    if mode in ("none", False, None):
        return
    for block in model.layers:
        checkpoint_block(block, "block" if mode is True else mode)
