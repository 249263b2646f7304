"""Validation perplexity of a checkpoint:

    python -m megatron_lax.evaluate --checkpoint DIR [--data DIR] [--tokens N] [--json]

Perplexity is exp(total NLL / total scored target tokens) over the fixed validation set, padding
excluded (never a mean of per-batch means).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from . import checkpoint, data
from .parallel.distributed import all_reduce_sum


@torch.no_grad()
def evaluate_nll(engine, batches) -> tuple[float, int]:
    """Summed NLL and scored-token count over this rank's batches, summed over all ranks."""
    device = engine.dist.device
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in batches:
        nll, count = engine.eval_nll(x, y)
        totals[0] += nll.double()
        totals[1] += count
    all_reduce_sum(totals)
    return float(totals[0]), int(totals[1])


def evaluate_checkpoint(path: Path, data_path: str | None = None, tokens: int = 0, micro_batch: int = 0) -> dict:
    from .parallel import build_engine
    from .parallel.distributed import init_distributed
    from .model import LlamaLax

    ckpt = checkpoint.resolve_checkpoint_dir(path)
    cfg = checkpoint.checkpoint_config(ckpt)
    cfg.parallel.engine, cfg.train.compile, cfg.train.activation_checkpointing = "single", False, False
    if data_path:
        cfg.data.path = data_path
    dist = init_distributed("single", cfg.train.device)
    engine = build_engine(cfg, LlamaLax(cfg.model), dist)
    engine.load(ckpt)
    engine.train(False)
    n_tokens = tokens or cfg.train.eval_tokens or cfg.data.val_tokens
    batches = data.validation_batches(cfg.data.path, cfg.data.seq_len, micro_batch or cfg.train.micro_batch,
                                      n_tokens, cfg.data.mode)
    nll, count = evaluate_nll(engine, [(x.to(dist.device), y.to(dist.device)) for x, y in batches])
    loss = nll / max(count, 1)
    return {"checkpoint": str(ckpt), "val_loss": loss, "val_ppl": math.exp(loss), "tokens": count}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_lax.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint or run directory")
    parser.add_argument("--data", help="prepared data directory (default: the one the run used)")
    parser.add_argument("--tokens", type=int, default=0, help="validation tokens (default: the run's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        result = evaluate_checkpoint(args.checkpoint, args.data, args.tokens)
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(f"validation perplexity {result['val_ppl']:.3f} (loss {result['val_loss']:.4f}) "
              f"on {result['tokens']} tokens  [{result['checkpoint']}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
