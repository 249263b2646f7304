"""The validation metrics of a checkpoint written by any engine, as its task scores them (a language
model's perplexity, a ViT's accuracy: Task.evaluate_checkpoint):

    python -m megatron_lax.evaluate --checkpoint DIR [--data DIR] [--tokens N] [--json]
    torchrun --nproc_per_node 8 -m megatron_lax.evaluate --checkpoint DIR     (same number, faster)

Perplexity is exp(total NLL / total scored target tokens) over the fixed validation set, padding
excluded (never a mean of per-batch means), with a 95% interval (tasks/language_modeling.py). It is
computed in the precision the run validated in during training (`--precision run`, the default; see
`evaluation_precision`), so the two agree, or in `--precision fp32` on the fp32 master weights.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch

from .loading.ours import load_checkpoint_model as load_model
from .parallel.distributed import init_distributed, shutdown
from .parallel import trust
from .tasks import task_class
from .training import checkpoint


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
    """The checkpoint's validation metrics, as its task scores a saved model (Task.evaluate_checkpoint)."""
    return evaluate_with_task(path, data_path, tokens, micro_batch, precision)[1]


def evaluate_with_task(path: Path, data_path: str | None, tokens: int, micro_batch: int, precision: str):
    """(the checkpoint's task class, evaluate_checkpoint's result)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = init_distributed("ddp" if world > 1 else "single", "auto")
    model, cfg, ckpt, step = load_for_evaluation(path, dist.device)
    name, dtype, autocast = evaluation_precision(cfg, dist.device, precision)
    model.to(dtype)
    context = torch.autocast(dist.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    task = task_class(cfg)
    with context:
        result = task.evaluate_checkpoint(model, cfg, dist, data_path, tokens, micro_batch)
    return task, {"checkpoint": str(ckpt), "step": step, "engine": cfg.parallel.engine, "precision": name, **result}


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
            task, result = evaluate_with_task(args.checkpoint, args.data, args.tokens, args.micro_batch,
                                              args.precision)
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result) if args.json else
              f"{task.describe_evaluation(result)}  [{result['checkpoint']}, step {result['step']}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
