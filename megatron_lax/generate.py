"""Sample text from a checkpoint or an export, as a sanity check:

    python -m megatron_lax.generate --checkpoint DIR --prompt "The city council" [--max-new-tokens 50]
        [--temperature 0.8] [--top-k 50] [--greedy]

`decode_batch` is the evaluation decoder: batched, left-padded prompts, a KV cache (one forward of
the new tokens per step), greedy or beam search.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .parallel import trust
from .training import checkpoint
from .models import family_of


# --- batched decoding with a KV cache -------------------------------------------------------------------

def _start(model, prompts: list[list[int]], rows_per_prompt: int, max_new_tokens: int):
    """Left-pads the prompts (each repeated rows_per_prompt times), runs them through the model into a
    fresh cache, and returns (last logits (rows, vocab) in fp32, cache, next rotary position per row)."""
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    width, rows = max(len(p) for p in prompts), len(prompts) * rows_per_prompt
    tokens = torch.zeros(rows, width, dtype=torch.long, device=device)
    cache = family_of(model.cfg).new_cache(model.cfg, rows, width + max_new_tokens, device, dtype)
    for i, p in enumerate(prompts):
        for row in range(i * rows_per_prompt, (i + 1) * rows_per_prompt):
            tokens[row, width - len(p):] = torch.tensor(p, device=device)
            cache.valid[row, width - len(p):width] = True
    positions = (cache.valid[:, :width].long().cumsum(1) - 1).clamp(min=0)
    logits = model(tokens, cache, positions)[:, -1].float()
    return logits, cache, positions[:, -1] + 1


def _step(model, cache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    cache.valid[:, cache.length] = True
    return model(tokens[:, None], cache, positions[:, None])[:, -1].float()


@torch.no_grad()
def decode_batch(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int,
                 num_beams: int = 1) -> list[list[int]]:
    """Each prompt's continuation, up to and without EOS: greedy (num_beams 1), or beam search whose
    hypotheses are ranked by log-probability / generated length (length penalty 1, stopping when no
    live beam can beat the worst of num_beams finished ones), as Hugging Face's generate does."""
    if num_beams > 1:
        return _beam_search(model, prompts, max_new_tokens, eos_id, num_beams)
    logits, cache, positions = _start(model, prompts, 1, max_new_tokens)
    out, done = [[] for _ in prompts], [False] * len(prompts)
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        for row, t in enumerate(token.tolist()):
            if not done[row]:
                done[row] = t == eos_id
                if not done[row]:
                    out[row].append(t)
        if all(done) or step == max_new_tokens - 1:
            break
        logits = _step(model, cache, token, positions)
        positions = positions + 1
    return out


def _beam_search(model, prompts, max_new_tokens: int, eos_id: int, k: int) -> list[list[int]]:
    logits, cache, positions = _start(model, prompts, k, max_new_tokens)
    n = len(prompts)
    scores = torch.full((n, k), float("-inf"), device=logits.device)
    scores[:, 0] = 0.0  # the k rows of a prompt start equal: expand the first only
    beams = [[[] for _ in range(k)] for _ in range(n)]  # generated tokens of each live beam
    finished = [[] for _ in range(n)]  # (score / length, tokens)
    done = [False] * n
    for step in range(max_new_tokens):
        total = (torch.log_softmax(logits, -1).view(n, k, -1) + scores[:, :, None]).view(n, -1)
        top_scores, top_ids = total.topk(2 * k, dim=-1)
        vocab = logits.shape[-1]
        parents = torch.zeros(n, k, dtype=torch.long)
        next_tokens = torch.full((n, k), eos_id, dtype=torch.long)
        next_scores = torch.full((n, k), float("-inf"))
        last = step == max_new_tokens - 1
        for i in range(n):
            if done[i]:
                continue
            new_beams = []
            for score, index in zip(top_scores[i].tolist(), top_ids[i].tolist()):
                beam, token = divmod(index, vocab)
                if token == eos_id:
                    finished[i].append((score / (len(beams[i][beam]) + 1), beams[i][beam]))
                    continue
                kept = len(new_beams)
                parents[i, kept], next_tokens[i, kept], next_scores[i, kept] = beam, token, score
                new_beams.append(beams[i][beam] + [token])
                if len(new_beams) == k:
                    break
            new_beams += [new_beams[-1] if new_beams else []] * (k - len(new_beams))  # dead rows (score -inf)
            beams[i] = new_beams
            finished[i] = sorted(finished[i], key=lambda h: -h[0])[:k]
            best_live = next_scores[i, 0].item() / (step + 1)
            if last:
                finished[i] += [(next_scores[i, b].item() / (step + 1), beams[i][b]) for b in range(k)]
            done[i] = last or (len(finished[i]) == k and finished[i][-1][0] >= best_live)
        if all(done):
            break
        rows = (torch.arange(n)[:, None] * k + parents).view(-1).to(logits.device)
        cache.reorder(rows)
        positions = positions[rows]
        scores = next_scores.to(logits.device)
        logits = _step(model, cache, next_tokens.view(-1).to(logits.device), positions)
        positions = positions + 1
    return [max(hyps, key=lambda h: h[0])[1] for hyps in finished]


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
    """(model, tokenizer spec) from a checkpoint/run directory (pre-training or fine-tuning), a
    megatron_lax export or a Hugging Face LLaMA directory."""
    from .loading.finetuned import load_any
    model, tokenizer = load_any(path)
    if not family_of(model.cfg).uses_tokenizer:
        raise ValueError(f"{path} holds a {model.cfg.arch} image classifier, which generates no text "
                         f"(python -m megatron_lax.evaluate scores it)")
    return model, tokenizer


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
    parser.add_argument("--trust-checkpoint", action="store_true", help="unpickle checkpoint files that need it (DeepSpeed's) from this source; only for files you trust")
    args = parser.parse_args(argv)
    from .data.tokenizer import load_tokenizer
    try:
        with trust.trusting(everything=args.trust_checkpoint):
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
