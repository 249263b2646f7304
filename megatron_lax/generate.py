"""Sample text from a checkpoint or an export, as a sanity check:

    python -m megatron_lax.generate --checkpoint DIR --prompt "The city council" [--max-new-tokens 50]
        [--temperature 0.8] [--top-k 50] [--greedy]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import checkpoint


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             greedy: bool = False, eos_id: int = -1, generator: torch.Generator | None = None) -> list[int]:
    """Autoregressive sampling without a KV cache (the models are small; clarity first)."""
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=next(model.parameters()).device)
    for _ in range(max_new_tokens):
        logits = model(ids[:, -model.cfg.max_seq_len:])[0, -1].float()
        if greedy:
            token = int(logits.argmax())
        else:
            logits = logits / max(temperature, 1e-5)
            if top_k > 0:
                threshold = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < threshold, float("-inf"))
            token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
        if token == eos_id:
            break
    return ids[0, len(prompt_ids):].tolist()


def load_for_generation(path: Path):
    """(model, tokenizer spec) from a checkpoint/run directory or a megatron_lax export."""
    from .evaluate import load_model
    from .export import OUR_FORMAT, load_pretrained
    if (path / OUR_FORMAT).is_file():
        model = load_pretrained(path)
        return model, str(path / "tokenizer")
    model, cfg, _ = load_model(path, torch.device("cpu"))
    return model, cfg.data.tokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_lax.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from tokenizer import load_tokenizer
    try:
        model, tokenizer_spec = load_for_generation(args.checkpoint)
        tok = load_tokenizer(tokenizer_spec)
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = generate(model, tok.encode(args.prompt), args.max_new_tokens, args.temperature, args.top_k, args.greedy,
                   tok.eos_id, torch.Generator().manual_seed(args.seed))
    print(args.prompt + tok.decode([t for t in out if t != tok.eos_id]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
