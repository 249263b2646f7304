"""Adapter-only training against full fine-tuning of the same dense base: optimizer state, gradient
and peak-memory cost (each contender in its own process, so peak RSS is its own), and step time
(interleaved rounds in one process).

    python benchmarks/bench_finetune.py [--shape llama_60m] [--rank 32] [--rounds 6] [--steps 2]
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import SHAPES, markdown_table, model_config, print_header, random_batch, time_interleaved  # noqa: E402
from megatron_lax.config import LoraConfig, OptimConfig  # noqa: E402
from megatron_lax.models.lora import apply_lora, trainable_parameters  # noqa: E402
from megatron_lax.models.llama import LlamaLax, token_nll  # noqa: E402
from megatron_lax.parallel.optim import build_optimizer  # noqa: E402

CONTENDERS = {"full fine-tuning": None, "LoRA": "none", "LaX-LoRA (identity)": "identity",
              "LaX-LoRA (linear)": "linear"}


def build(shape: str, name: str, rank: int) -> torch.nn.Module:
    model = LlamaLax(model_config(shape), init_seed=0).train()
    gate = CONTENDERS[name]
    return model if gate is None else apply_lora(model, LoraConfig(rank=rank, alpha=2 * rank, lax_gate=gate))


def training_step(model: torch.nn.Module, inputs, targets):
    """Our optimizer (fused AdamW over the trainable parameters) and our loss."""
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4, weight_decay=0.0))

    def step():
        nll, count = token_nll(model(inputs), targets)
        (nll / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure_memory(shape: str, name: str, rank: int, steps: int) -> dict:
    """Run in a fresh process: the peak RSS of `steps` training steps above the RSS of the built model."""
    spec = SHAPES[shape]
    model = build(shape, name, rank)
    inputs, targets = random_batch(model.cfg.vocab_size, spec["batch"], spec["seq_len"])
    before = peak_rss_mb()
    step, optimizer = training_step(model, inputs, targets)
    for _ in range(steps):
        step()
    model.zero_grad(set_to_none=False)  # materialise the gradients once more to count their bytes
    nll, count = token_nll(model(inputs), targets)
    (nll / count).backward()
    return {"trainable": trainable_parameters(model), "parameters": sum(p.numel() for p in model.parameters()),
            "optimizer_mb": tensor_bytes(t for s in optimizer.state.values() for t in s.values()
                                         if torch.is_tensor(t) and t.dim() > 0) / 2**20,
            "gradient_mb": tensor_bytes(p.grad for p in model.parameters() if p.grad is not None) / 2**20,
            "model_rss_mb": before, "training_rss_mb": peak_rss_mb() - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama_60m", choices=list(SHAPES))
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2, help="training steps per contender per round")
    parser.add_argument("--memory-of", choices=list(CONTENDERS), help=argparse.SUPPRESS)  # the per-contender process
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(measure_memory(args.shape, args.memory_of, args.rank, steps=3)))
        return
    memory = {}
    for name in CONTENDERS:
        out = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--rank", str(args.rank),
                              "--memory-of", name], capture_output=True, text=True, check=True).stdout
        memory[name] = json.loads(out.strip().splitlines()[-1])
    spec = SHAPES[args.shape]
    base = build(args.shape, "full fine-tuning", args.rank)
    inputs, targets = random_batch(base.cfg.vocab_size, spec["batch"], spec["seq_len"])
    steps = {name: training_step(build(args.shape, name, args.rank) if name != "full fine-tuning" else copy.deepcopy(base),
                                 inputs, targets)[0] for name in CONTENDERS}
    timing = time_interleaved(steps, spec["batch"] * spec["seq_len"], args.rounds, args.steps)

    print_header(f"Fine-tuning cost, {args.shape} base (batch {spec['batch']} x {spec['seq_len']} tokens), "
                 f"adapters r={args.rank} on q,k,v,up,down")
    rows = []
    for name, m in memory.items():
        rows.append([name, f"{m['trainable']:,} ({100 * m['trainable'] / m['parameters']:.2f}%)",
                     f"{m['optimizer_mb']:.1f}", f"{m['gradient_mb']:.1f}", f"{m['training_rss_mb']:.0f}",
                     f"{timing.median(name):,.0f}", timing.ratio_cell(name, "full fine-tuning")])
    print(markdown_table(["", "trainable parameters", "AdamW state (MiB)", "gradients (MiB)",
                          "peak RSS above the model (MiB)", "tokens/s (median)", "speed vs full [quartiles]"], rows))


if __name__ == "__main__":
    main()
