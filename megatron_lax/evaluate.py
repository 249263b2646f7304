"""Validation perplexity of a checkpoint written by any engine:

    python -m megatron_lax.evaluate --checkpoint DIR [--data DIR] [--tokens N] [--json]
    torchrun --nproc_per_node 8 -m megatron_lax.evaluate --checkpoint DIR     (same number, faster)

Perplexity is exp(total NLL / total scored target tokens) over the fixed validation set, padding
excluded (never a mean of per-batch means). It is computed in the precision the run validated in
during training (`--precision run`, the default; see `evaluation_precision`), so the two agree, or in
`--precision fp32` on the fp32 master weights. The 95% interval treats each validation sequence (one
document in `paper` mode, a fixed-length window of the token stream in `packed` mode) as a unit:
a delta-method interval for the ratio estimator of the mean token NLL, exponentiated.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import tokens as data
from .loading.ours import load_checkpoint_model as load_model
from .models import family_of
from .parallel.distributed import init_distributed, is_distributed, shutdown
from .parallel import trust
from .training import checkpoint


@torch.no_grad()
def sequence_nll(model, batches, device) -> torch.Tensor:
    """(n_sequences, 2): summed NLL and scored tokens of each of this rank's sequences (the fully
    masked rows that pad a rank's share to the common batch count are left out)."""
    rows = []
    for x, y in batches:
        logits = model(x.to(device)).float()
        y = y.to(device)
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=data.IGNORE, reduction="none")
        rows.append(torch.stack([nll.view_as(y).sum(1).double(), (y != data.IGNORE).sum(1).double()], dim=1))
    rows = torch.cat(rows) if rows else torch.zeros(0, 2, dtype=torch.float64, device=device)
    return rows[rows[:, 1] > 0]


def perplexity_interval(per_sequence: torch.Tensor, z: float = 1.96) -> dict:
    nll, tokens = per_sequence[:, 0], per_sequence[:, 1]
    loss = float(nll.sum() / tokens.sum())
    n = len(per_sequence)
    residual = nll - loss * tokens
    stderr = math.sqrt(float(residual.pow(2).sum()) / max(n - 1, 1) / n) / float(tokens.mean()) if n > 1 else 0.0
    return {"val_loss": loss, "val_ppl": math.exp(loss), "ppl_low": math.exp(loss - z * stderr),
            "ppl_high": math.exp(loss + z * stderr), "tokens": int(tokens.sum()), "sequences": n}


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return rows
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, rows.cpu())
    return torch.cat(gathered)


def evaluation_precision(cfg, device: torch.device, requested: str = "run") -> tuple[str, torch.dtype, bool]:
    """(name, weight dtype, autocast) that reproduce how the run computed during training:
    fp32 -> fp32; bf16-pure -> bf16 weights; bf16-mixed -> bf16 autocast over fp32 weights on the
    single/DDP engines, bf16 weights on FSDP2 (its MixedPrecisionPolicy gathers bf16 parameters) and
    DeepSpeed (its bf16 mode casts the module)."""
    from .parallel.engine import resolve_precision
    precision = "fp32" if requested == "fp32" else resolve_precision(cfg.train.precision, device)
    if precision == "fp32":
        return "fp32", torch.float32, False
    if precision == "bf16-pure" or cfg.parallel.engine in ("fsdp", "deepspeed"):
        return f"{precision} (bf16 weights)", torch.bfloat16, False
    return f"{precision} (bf16 autocast)", torch.float32, True


def load_for_evaluation(path: Path, device: torch.device):
    """(model, config, what was loaded, step) of a checkpoint or run directory, or of one of our exports."""
    from .config import load_config
    from .loading.ours import OUR_FORMAT, load_pretrained
    from .loading.transformers_export import is_transformers_export, load_transformers_export
    path = Path(path)
    if is_transformers_export(path):
        model, cfg, step = load_transformers_export(path, device)
        return model, cfg, path, step
    if (path / OUR_FORMAT).is_file():
        step = json.loads((path / OUR_FORMAT).read_text()).get("step")
        return load_pretrained(path, device), load_config(str(path / "config.yaml")), path, step
    model, cfg, ckpt = load_model(path, device)
    return model, cfg, ckpt, json.loads((ckpt / "trainer_state.json").read_text())["step"]


def evaluate_checkpoint(path: Path, data_path: str | None = None, tokens: int = 0, micro_batch: int = 0,
                        precision: str = "run") -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = init_distributed("ddp" if world > 1 else "single", "auto")
    model, cfg, ckpt, step = load_for_evaluation(path, dist.device)
    name, dtype, autocast = evaluation_precision(cfg, dist.device, precision)
    model.to(dtype)
    if not family_of(cfg.model).uses_tokenizer:
        return evaluate_images(model, cfg, ckpt, step, dist, name, autocast, data_path, micro_batch)
    if cfg.data.source == "stream" and not data_path:  # a streamed run: the stream's (cached) validation set
        return evaluate_streamed(model, cfg, ckpt, step, dist, name, autocast, tokens, micro_batch)
    if data_path:  # shards of another tokenizer would give a number that means nothing
        data.check_tokenizer(data.read_manifest(data_path), cfg.data.tokenizer, data_path)
    batches = data.validation_batches(data_path or cfg.data.path, cfg.data.seq_len,
                                      micro_batch or cfg.train.micro_batch,
                                      tokens or cfg.train.eval_tokens or cfg.data.val_tokens, cfg.data.mode,
                                      dist.rank, dist.world_size)
    context = torch.autocast(dist.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        result = perplexity_interval(gather_rows(sequence_nll(model, batches, dist.device)))
    data_dir = data_path or cfg.data.path
    unigram = data.unigram_perplexity(data_dir, cfg.data.seq_len, cfg.data.mode,
                                      tokens or cfg.train.eval_tokens or cfg.data.val_tokens)
    return {"checkpoint": str(ckpt), "step": step, "engine": cfg.parallel.engine, "mode": cfg.data.mode,
            "precision": name, "unigram_ppl": unigram, **result}


def evaluate_streamed(model, cfg, ckpt: Path, step, dist, precision_name: str, autocast: bool, tokens: int,
                      micro_batch: int) -> dict:
    from .data.streaming import Stream
    stream = Stream(cfg.data, dist.rank, dist.world_size)
    n_tokens = tokens or cfg.train.eval_tokens or cfg.data.val_tokens
    batches = stream.validation_batches(micro_batch or cfg.train.micro_batch, n_tokens)
    context = torch.autocast(dist.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        result = perplexity_interval(gather_rows(sequence_nll(model, batches, dist.device)))
    return {"checkpoint": str(ckpt), "step": step, "engine": cfg.parallel.engine, "mode": cfg.data.mode,
            "precision": precision_name, "unigram_ppl": stream.unigram_perplexity(n_tokens), **result}


def evaluate_images(model, cfg, ckpt: Path, step, dist, precision_name: str, autocast: bool, data_path: str | None,
                    micro_batch: int) -> dict:
    """A ViT checkpoint's top-1 / top-5 accuracy and loss on its run's validation split (one process)."""
    from .tasks.image_classification import evaluate_model
    if dist.world_size > 1:
        raise ValueError("evaluating a ViT checkpoint runs on one process")
    if data_path:
        cfg.data.path = data_path
    context = torch.autocast(dist.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        result = evaluate_model(model, cfg, dist.device, cfg.data.eval_split, cfg.data.val_images, micro_batch)
    return {"checkpoint": str(ckpt), "step": step, "engine": cfg.parallel.engine, "precision": precision_name,
            **result}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_lax.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="checkpoint or run directory, or an export in our format")
    parser.add_argument("--data", help="prepared data directory (default: the one the run used, or its stream)")
    parser.add_argument("--tokens", type=int, default=0, help="validation tokens (default: the run's)")
    parser.add_argument("--micro-batch", type=int, default=0)
    parser.add_argument("--precision", choices=("run", "fp32"), default="run",
                        help="run: as the run validated during training (default); fp32: fp32 master weights")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--trust-checkpoint", action="store_true", help="unpickle checkpoint files that need it (DeepSpeed's) from this source; only for files you trust")
    args = parser.parse_args(argv)
    try:
        with trust.trusting(everything=args.trust_checkpoint):
            result = evaluate_checkpoint(args.checkpoint, args.data, args.tokens, args.micro_batch, args.precision)
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        if args.json:
            print(json.dumps(result))
        elif "val_acc1" in result:
            print(f"top-1 accuracy {result['val_acc1']:.2f}% (top-5 {result['val_acc5']:.2f}%, loss "
                  f"{result['val_loss']:.4f}) on {result['val_images']} images of the {result['split']} split "
                  f"({result['skipped_images']} unreadable), {result['precision']}  [{result['checkpoint']}, step "
                  f"{result['step']}]")
        else:
            print(f"validation perplexity {result['val_ppl']:.3f} (95% interval {result['ppl_low']:.3f}-"
                  f"{result['ppl_high']:.3f}, loss {result['val_loss']:.4f}) on {result['tokens']} tokens in "
                  f"{result['sequences']} sequences, {result['precision']}; unigram baseline "
                  f"{result['unigram_ppl']:.3f}  [{result['checkpoint']}, step {result['step']}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
