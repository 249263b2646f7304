"""What every format and LaX gate keeps for the backward pass: bytes per token per block, counted on
a real forward pass (saved tensors, checkpointed blocks' inputs and the low-rank mode's kept latents,
under FakeTensorMode, so the 1B shapes run on a CPU), for train.activation_checkpointing none, block
and lowrank, next to the plan's formula (models/llama.py block_saved_bytes). LaX's own share is the
difference to the same format without LaX.

    python benchmarks/bench_activation_memory.py [--dtype bf16] [--seq-len 256]

Tensor-train is built for the ViT only (its modes are Table 13's): its rows are ViT-B blocks of
197 tokens, measured (the plan models the LLaMA family).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import markdown_table, print_header  # noqa: E402
from megatron_lax.config import load_config  # noqa: E402
from megatron_lax.models.llama import LlamaLax, block_saved_bytes  # noqa: E402
from megatron_lax.models.vit import ViTLax  # noqa: E402
from megatron_lax.training.introspection import block_activation_bytes  # noqa: E402

MODES = ("none", "block", "lowrank")
GATES = ("none", "identity", "linear", "dense", "tensor")
VARIANTS = [("dense", "none")] + [(method, gate) for method in ("svd", "cola") for gate in GATES]


def llama_row(preset, method, gate, seq_len, dtype):
    cfg = load_config(preset, {"model.method": method, "model.lax_gate": gate, "model.vocab_size": "128"}).model

    def build(n_layers):
        cfg.n_layers = n_layers
        return LlamaLax(cfg, init_seed=None)

    inputs = lambda batch: torch.zeros(batch, seq_len, dtype=torch.long)
    measured = {mode: block_activation_bytes(build, inputs, seq_len, mode, dtype) for mode in MODES}
    cfg.n_layers = 4  # block 2 crosses and hands on, as the measured third block
    planned = {mode: block_saved_bytes(cfg, 2, mode, dtype.itemsize, flash=False) for mode in MODES}
    return measured, planned


def vit_row(preset, gate, dtype):
    cfg = load_config(preset, {"model.method": "tt", "model.lax_gate": gate, "model.num_classes": "10",
                               "model.in_channels": "3"}).model
    tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1

    def build(n_layers):
        cfg.n_layers = n_layers
        return ViTLax(cfg, init_seed=None)

    inputs = lambda batch: torch.zeros(batch, 3, cfg.image_size, cfg.image_size)
    return {mode: block_activation_bytes(build, inputs, tokens, mode, dtype) for mode in MODES}, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print_header(f"Saved for backward, bytes per token per block ({args.dtype} activations)")
    rows = []
    for preset, method, gate, (measured, planned) in (
            [(p, m, g, llama_row(p, m, g, args.seq_len, dtype)) for p in ("llama_60m", "llama_1b") for m, g in VARIANTS]
            + [("vit_b", "tt", g, vit_row("vit_b", g, dtype)) for g in ("none", "identity", "tensor")]):
        base = next((r for r in rows if r[0] == preset and r[1] == method and r[2] == "none"), None)
        share = "" if base is None or gate == "none" else \
            f"+{measured['none'] - base[3]['none']:,.0f} B ({100 * (measured['none'] / base[3]['none'] - 1):+.1f}%)"
        agree = "-" if planned is None else ("=" if all(planned[m] == measured[m] for m in MODES) else "DIFFERS")
        rows.append((preset, method, gate, measured, share, agree))
    print(markdown_table(
        ["shape", "method", "LaX gate", "off", "block", "lowrank", "LaX's share (off)", "plan formula"],
        [[p, m, g, *(f"{meas[mode]:,.0f}" for mode in MODES), share, agree] for p, m, g, meas, share, agree in rows]))
    print("\noff / block / lowrank: train.activation_checkpointing none / block / lowrank; plan formula `=`: "
          "models/llama.py block_saved_bytes gives the same bytes in all three modes.")


if __name__ == "__main__":
    main()
