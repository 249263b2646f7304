"""Pre-training entry point:  python -m megatron_lax.train --config FILE [--section.key value ...]

The config's model family picks the task (a LLaMA: language modelling on C4-format shards; a ViT:
image classification); the training loop (megatron_lax.training) and the engine (megatron_lax.parallel)
are the same for every task.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .config import Config, ConfigError, add_config_arguments, config_from_args, dump_yaml
from .data.tokens import DataExhausted
from .parallel.distributed import end_process
from .tasks import task_class, task_named
from .training import checkpoint
from .training.trainer import Trainer, TrainingError, train


def make_trainer(cfg: Config, task: str | None = None) -> Trainer:
    """A Trainer for the config's task (train.task, or its model family's), or the task named."""
    return Trainer(cfg, task_named(task) if task else task_class(cfg))


def main(argv=None, prog: str = "python -m megatron_lax.train", doc: str = __doc__, task: str | None = None,
         print_summary: bool = False, exiting: bool = False) -> int:
    """The command line of a training run: pre-training, or with `task` another task (fine-tuning:
    megatron_lax.finetune) and a JSON summary line at the end. `exiting`: the process ends with it
    (see training.trainer.train)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML (train.steps from the token budget) and exit")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        if task is not None:
            cfg.train.task = task
        chosen = task_class(cfg)
        if args.print_config:
            print(dump_yaml(chosen.display_config(cfg)), end="")
            return 0
        summary = train(cfg, chosen, exiting)
    except (ConfigError, ValueError, FileNotFoundError, checkpoint.CheckpointError, TrainingError,
            DataExhausted) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if print_summary and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: summary[k] for k in ("val_loss", "val_ppl", "steps", "checkpoint") if k in summary}))
    return 0



if __name__ == "__main__":
    end_process(main(exiting=True))
