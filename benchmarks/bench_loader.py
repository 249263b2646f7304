"""Loader cost per training step, as a fraction of the tiny model's step time (target: under 1%).

    python benchmarks/bench_loader.py [--micro-batch 16] [--seq-len 256] [--mode packed]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from megatron_lax import data
from megatron_lax.config import DataConfig, load_config
from megatron_lax.model import LlamaLax, token_nll
from megatron_lax.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--mode", default="packed", choices=["packed", "paper"])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = data.ensure_prepared(DataConfig(path=tmp, raw=str(REPO / "data" / "sample"),
                                               tokenizer=str(REPO / "tokenizer" / "sample")))
        loader = data.TrainLoader(path, args.seq_len, args.mode, args.micro_batch, args.micro_batch)
        vocab = data.model_vocab_size(data.read_manifest(path), 0)
        start = time.perf_counter()
        batches = [next(loader) for _ in range(loader.steps_per_epoch)]
        load_time = (time.perf_counter() - start) / len(batches)
    cfg = load_config("llama_tiny", {"model.method": "svd", "model.lax_gate": "identity", "model.vocab_size": vocab})
    model = LlamaLax(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    times = []
    for x, y in batches[: args.steps + 1]:
        start = time.perf_counter()
        nll, count = token_nll(model(x), y)
        (nll / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    step_time = sorted(times[1:])[len(times[1:]) // 2]  # median, first step excluded
    print(f"| mode | micro-batch x seq | loader per batch | tiny SVD+LaX step | loader / step |")
    print("|---|---|---|---|---|")
    print(f"| {args.mode} | {args.micro_batch} x {args.seq_len} | {load_time * 1e3:.3f} ms | "
          f"{step_time * 1e3:.0f} ms | {load_time / step_time:.3%} |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
