"""What a linear format is (formats.py registers them): one subclass of `Format` per file."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

ROLE_NAMES = {"attn": "attention", "mlp": "MLP", "mlp_out": "MLP output"}  # ModelConfig.role_of

class ProjectionRules:
    """Each projection's role and rank, and which projections cross, from the model's fields; shared by
    config.ModelConfig and the configs of transformers exports (hub/llama.py, hub/vit.py copy it)."""

    def role_of(self, projection: str) -> str:
        """attn (q, k, v, o), mlp_out (the MLP's output: ViT fc2, LLaMA down) or mlp (the rest)."""
        if projection in ("q", "k", "v", "o"):
            return "attn"
        return "mlp_out" if projection in ("fc2", "down") else "mlp"

    def crosses(self, projection: str, layer: int) -> bool:
        """Whether this projection of block `layer` receives the previous block's latent."""
        return self.uses_lax and layer > 0 and ("all" in self.lax_modules or projection in self.lax_modules)

    def rank_of(self, projection: str) -> int:
        role = self.role_of(projection)
        if role == "mlp_out" and self.mlp_out_rank is not None:
            return self.mlp_out_rank
        specific = self.attn_rank if role == "attn" else self.mlp_rank
        return specific if specific is not None else self.rank

    @property
    def uses_lax(self) -> bool:
        return self.lax_gate != "none"


class Format:
    """One linear format. `name` is its model.method value; the defaults below fit a low-rank format
    with one rank per projection (cfg.rank_of) and a latent LaX can cross."""
    name: str = ""
    label: str = ""  # in tables and plots ("SVD", "Tensor Train")
    fields: Optional[type] = None  # a dataclass of the model.* fields it adds (flat keys), or None
    lowrank: bool = True  # has a rank and a latent that LaX can cross
    default_lowrank_init: str = "cola"  # what model.lowrank_init auto resolves to
    # A place for a per-format piece other parts of the code add (None: not supported by this format):
    export = None  # how it is written for other tools (Hugging Face export)

    def validate(self, m, shapes: dict[str, tuple[int, int]]) -> None:
        """Raises ValueError (the config reports it as a ConfigError) on a config this format cannot
        build; `shapes` is the family's {projection: (d_in, d_out)}. The default: every rank (model.rank,
        attn_rank, mlp_rank, mlp_out_rank) positive and at most min(d_in, d_out)."""
        checked = set()
        for projection, (d_in, d_out) in shapes.items():
            kind = ROLE_NAMES[m.role_of(projection)]
            if kind in checked:
                continue
            checked.add(kind)
            r = m.rank_of(projection)
            if r <= 0:
                raise ValueError(f"model.method {self.name} needs a positive {kind} rank (model.rank), got {r}")
            if r > min(d_in, d_out):
                raise ValueError(f"{kind} rank {r} is larger than min(d_in, d_out) = {min(d_in, d_out)}")

    def validate_unused(self, m) -> None:
        """Raises ValueError when the config sets one of this format's fields while another format is
        chosen (a setting that would silently do nothing)."""

    def build(self, cfg, projection: str, d_in: int, d_out: int, bias: bool, activation: str,
              crossing: dict) -> nn.Module:
        """The projection's module: a DenseLinear or a LatentLinear subclass (forward(x, prev) ->
        (y, latent)). `crossing` holds LatentLinear's LaX arguments (gate, gate_init, latent, norm)."""
        raise NotImplementedError

    def count(self, cfg, projection: str, d_in: int, d_out: int) -> tuple[int, int, int]:
        """(parameters, forward FLOPs per token, latent width) of the projection without its crossing
        and bias."""
        raise NotImplementedError

    def saved_bytes(self, cfg, projection: str, d_in: int, d_out: int, layer: int, mode: str,
                    act_bytes: int) -> int:
        """Bytes per token the projection keeps for backward beyond its input, under
        train.activation_checkpointing `mode` (none, block, lowrank), with activations of `act_bytes`
        bytes: the memory plan's count, which the tests check against a real forward's saved tensors.
        A format that does not declare it cannot be planned (python -m megatron_lax.plan says so)."""
        raise NotImplementedError(f"model.method {self.name} does not count what it keeps for backward "
                                  f"(Format.saved_bytes in its file), so the memory plan cannot size it")

    def kept_flops(self, cfg, projection: str, d_in: int, d_out: int) -> int:
        """Forward FLOPs per token of the matmul whose output low-rank recompute keeps (its module's
        kept_matmul()), which a lowrank-checkpointed backward does not redo; 0: it redoes everything."""
        return 0

    def mergeable(self, cfg) -> bool:
        """Whether a trained projection is one dense weight matrix (W, or B A): a base LoRA can go on,
        or a Hugging Face LLaMA export."""
        return False

    def vit_overrides(self, scale, gate: str) -> dict:
        """The model overrides of the paper's ViT `scale` (paper.ViTScale, Tables 9-10) for this format."""
        return {"model.rank": str(scale.rank)} if self.lowrank and scale.rank else {}

    def describe(self, cfg) -> str:
        """The variant's label with its LaX settings, e.g. "SVD + LaX (identity)"."""
        return self.label + (f" + LaX ({cfg.lax_gate})" if cfg.uses_lax else "")


HF_SOURCE = ("ROLE_NAMES",)  # what a transformers export copies from here beside the Format class (megatron_lax/hub/)
