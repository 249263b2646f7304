"""Loader cost per micro-batch, as a fraction of the tiny model's forward+backward on that
micro-batch (target: under 1%). A training step is global_batch / micro_batch of both, so the
fraction is the same per step (and smaller once the optimizer step is counted).

    python benchmarks/bench_loader.py [--micro-batch 16] [--seq-len 256] [--method svd --lax-gate identity]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron_lax.data import tokens as data  # noqa: E402
from megatron_lax.config import DataConfig, load_config  # noqa: E402
from megatron_lax.models.llama import LlamaLax, token_nll  # noqa: E402


def loader_seconds(path: Path, mode: str, seq_len: int, micro_batch: int) -> tuple[float, list]:
    """Mean time of next(loader) over one epoch of the sample, and the batches it gave."""
    loader = data.TrainLoader(path, seq_len, mode, micro_batch, micro_batch)
    start = time.perf_counter()
    batches = [next(loader) for _ in range(loader.steps_per_epoch)]
    return (time.perf_counter() - start) / len(batches), batches


def forward_backward_seconds(model: torch.nn.Module, batches: list, repeats: int) -> float:
    """Median forward+backward time over `repeats` micro-batches, after one warm-up."""
    times = []
    for x, y in batches[: repeats + 1]:
        start = time.perf_counter()
        nll, count = token_nll(model(x), y)
        (nll / count).backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--method", default="svd")
    parser.add_argument("--lax-gate", default="identity")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = data.ensure_prepared(DataConfig(path=tmp, raw=str(REPO / "data" / "sample"),
                                               tokenizer=str(REPO / "tokenizer" / "sample")))
        print("| mode | micro-batch x seq | next(loader) | tiny model fwd+bwd | loader / fwd+bwd |")
        print("|---|---|---|---|---|")
        vocab = data.model_vocab_size(data.read_manifest(path), 0)
        cfg = load_config("llama_tiny", {"model.method": args.method, "model.lax_gate": args.lax_gate,
                                         "model.vocab_size": vocab})
        model = LlamaLax(cfg.model)
        for mode in ("packed", "paper"):
            load, batches = loader_seconds(path, mode, args.seq_len, args.micro_batch)
            step = forward_backward_seconds(model, batches, args.repeats)
            print(f"| {mode} | {args.micro_batch} x {args.seq_len} | {load * 1e3:.3f} ms | {step * 1e3:.0f} ms | "
                  f"{load / step:.3%} |")
    print(f"\ntiny model: llama_tiny, method {args.method}, lax_gate {args.lax_gate}, vocab {vocab}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
