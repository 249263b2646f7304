"""Tasks: what a run trains on and how it is scored (tasks/base.py says what a task provides).

    language_modeling.py      next-token prediction on prepared C4-format shards (LLaMA pre-training)
    image_classification.py   images in class folders or Fashion-MNIST (ViT pre-training)
    instruction_tuning.py     LoRA / LaX-LoRA fine-tuning of a frozen LLaMA on instruction data

`task_class(cfg)` finds a run's task: `train.task`, or (auto) the task its model family is trained
for (models.FAMILIES). Tasks are imported when asked for, so a language-model run never loads the
image stack.
"""
from __future__ import annotations

import importlib

from ..config import Config, ConfigError
from ..models import family_of

TASKS = {  # name: (module, class), or the Task class itself
    "language_modeling": ("language_modeling", "LanguageModeling"),
    "image_classification": ("image_classification", "ImageClassification"),
    "instruction_tuning": ("instruction_tuning", "InstructionTuning"),
}


def task_named(name: str):
    if name not in TASKS:
        raise ConfigError(f"train.task {name!r} is unknown (choose from auto, {', '.join(TASKS)})")
    if isinstance(TASKS[name], type):  # a Task class registered as it is (a task defined outside this folder)
        return TASKS[name]
    module, cls = TASKS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def task_class(cfg: Config):
    name = cfg.train.task
    return task_named(family_of(cfg.model).task if name == "auto" else name)
