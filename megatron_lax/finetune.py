"""LoRA and LaX-LoRA fine-tuning on instruction data (the instruction_tuning task):

    python -m megatron_lax.finetune --config configs/finetune_arithmetic.yaml [--section.key value ...]

Accuracy on test files: python -m megatron_lax.finetune_eval. See megatron_lax/tasks/instruction_tuning.py.
"""
from __future__ import annotations

from .config import Config
from .parallel.distributed import end_process
from .tasks import task_named
from .train import main as train_main
from .training.trainer import train


def finetune(cfg: Config) -> dict:
    return train(cfg, task_named("instruction_tuning"))


def main(argv=None, exiting: bool = False) -> int:
    return train_main(argv, prog="python -m megatron_lax.finetune", doc=__doc__, task="instruction_tuning",
                      print_summary=True, exiting=exiting)


if __name__ == "__main__":
    end_process(main(exiting=True))
