"""The dense format: W x, no latent (the full-rank baseline; LaX does not apply)."""
from __future__ import annotations

from .base import Format
from .lowrank import DenseLinear


class Dense(Format):
    name, label, lowrank = "dense", "Full-rank", False
    export = "transformers"  # hub/ copies this class (and HF_SOURCE) into a transformers export

    def validate(self, m, shapes) -> None:
        if m.uses_lax:
            raise ValueError(f"model.lax_gate {m.lax_gate!r} needs a low-rank model.method, not dense")

    def build(self, cfg, projection, d_in, d_out, bias, activation, crossing):
        return DenseLinear(d_in, d_out, bias)

    def count(self, cfg, projection, d_in, d_out):
        return d_in * d_out, 2 * d_in * d_out, 0

    def saved_bytes(self, cfg, projection, d_in, d_out, layer, mode, act_bytes):
        return 0  # W x saves only its input; no latent to keep under lowrank recompute

    def mergeable(self, cfg) -> bool:
        return True

    def describe(self, cfg) -> str:
        return self.label
