"""Training tokens/s (forward + backward + AdamW) of our dense LlamaLax against Hugging Face
transformers' LlamaForCausalLM at the same shapes, dtype (fp32), batch and loss, in one process.

    python benchmarks/bench_vs_hf.py [--shapes llama_tiny llama_60m] [--rounds 10] [--steps 2]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (SHAPES, markdown_table, model_config, ours_step, print_header,  # noqa: E402
                               random_batch, time_interleaved, training_step)


def hf_step(model_cfg, inputs, targets, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.dim,
                         intermediate_size=model_cfg.ffn_dim, num_hidden_layers=model_cfg.n_layers,
                         num_attention_heads=model_cfg.n_heads, num_key_value_heads=model_cfg.n_heads,
                         max_position_embeddings=model_cfg.max_seq_len, rms_norm_eps=model_cfg.norm_eps,
                         rope_theta=model_cfg.rope_theta, tie_word_embeddings=False, attention_bias=False,
                         mlp_bias=False, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_cfg).float().train()
    return training_step(model, lambda m, x: m(input_ids=x, use_cache=False).logits, inputs, targets), model


def compare(shape: str, rounds: int, steps: int) -> list:
    spec = SHAPES[shape]
    cfg = model_config(shape, method="dense")
    inputs, targets = random_batch(cfg.vocab_size, spec["batch"], spec["seq_len"])
    ours = ours_step(cfg, inputs, targets)
    hf, hf_model = hf_step(cfg, inputs, targets)
    n_hf = sum(p.numel() for p in hf_model.parameters())
    print(f"{shape}: {n_hf / 1e6:.2f}M parameters (HF)", file=sys.stderr)
    timing = time_interleaved({"ours": ours, "hf": hf}, spec["batch"] * spec["seq_len"], rounds, steps)
    return [shape, f"{spec['batch']} x {spec['seq_len']}", f"{timing.median('ours'):.0f}",
            f"{timing.median('hf'):.0f}", timing.ratio_cell("ours", "hf"),
            f"±{100 * max(timing.spread('ours'), timing.spread('hf')):.0f}%"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2, help="training steps per contender per round")
    args = parser.parse_args()
    rows = [compare(shape, args.rounds, args.steps) for shape in args.shapes]
    print_header("Dense training step: megatron-lax vs Hugging Face LlamaForCausalLM (fp32)")
    print(markdown_table(["shape", "batch x seq", "ours tok/s", "HF tok/s", "ours / HF (paired median [quartiles])",
                          "round spread"], rows))


if __name__ == "__main__":
    main()
