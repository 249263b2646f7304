"""What a model family is (models/__init__.py registers them): one subclass of `Family` per file."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


class Family:
    """Everything about one model family. `name` is its model.arch value."""
    name: str = ""
    fields: Optional[type] = None  # a dataclass of the model.* fields it adds (flat keys), or None
    projections: tuple = ()  # its projection names (model.lax_modules, ModelConfig.role_of)
    task: str = ""  # the task (megatron_lax.tasks) it is trained for by default (train.task auto)
    uses_tokenizer: bool = True  # its inputs are token ids (vocabulary from a tokenizer), else images
    data_fields: tuple = ()  # the model.* fields a run completes from its data (0 in a config: follow the data)
    run_prefix: str = ""  # experiments name its runs' folders with it
    exports_to_huggingface: bool = False  # a mergeable model of it is written as a Hugging Face directory
    transformers_export: str = ""  # its module in megatron_lax/hub/ (a transformers folder with remote code), if any

    def build(self, cfg, init_seed: Optional[int] = 0) -> nn.Module:
        raise NotImplementedError

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, number of scored targets)."""
        raise NotImplementedError

    def new_cache(self, cfg, rows: int, capacity: int, device, dtype):
        """An empty cache of `capacity` positions for incremental decoding (megatron_lax.generate)."""
        raise NotImplementedError(f"model.arch {self.name} has no incremental decoding (Family.new_cache)")

    def projection_shapes(self, m) -> dict[str, tuple[int, int]]:
        """{projection: (d_in, d_out)}, for the formats' checks; by default by role (ModelConfig.role_of):
        attention dim -> dim, MLP dim -> ffn_dim, MLP output ffn_dim -> dim."""
        by_role = {"attn": (m.dim, m.dim), "mlp": (m.dim, m.ffn_dim), "mlp_out": (m.ffn_dim, m.dim)}
        return {p: by_role[m.role_of(p)] for p in self.projections}

    def validate(self, m) -> None:
        """Raises ValueError (reported as a ConfigError) on a config this family cannot build."""

    def count_parameters(self, cfg) -> int:
        """Analytic parameter count (tested against the built model)."""
        raise NotImplementedError

    def flops(self, cfg, seq_len: int = 0) -> dict:
        """{"forward", "train"} FLOPs per unit of the task (a token, an image)."""
        raise NotImplementedError

    def activation_rows(self, cfg, seq_len: int, mode: str, act_bytes: int, flash: bool) -> dict[str, int]:
        """The memory plan's bytes per sample of a micro-batch, by what holds them (what it keeps for
        backward under train.activation_checkpointing `mode`, workspaces), with activations of
        `act_bytes` bytes. A family that does not declare it cannot be planned."""
        raise NotImplementedError(f"model.arch {self.name} does not count its activations "
                                  f"(Family.activation_rows in its file), so the memory plan cannot size it")

    def recompute_flops(self, cfg, mode: str, seq_len: int = 0) -> float:
        """Extra forward FLOPs per unit a checkpointed backward spends; by default the whole forward again."""
        return 0.0 if mode == "none" else self.flops(cfg, seq_len)["forward"]


def memory_gb(n_params: int) -> float:
    """The paper's Table 5 estimate: BF16 weights, gradients and two Adam states (8 bytes per
    parameter), activations excluded, in GiB."""
    return n_params * 8 / 2**30
