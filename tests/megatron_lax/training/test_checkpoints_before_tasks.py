"""Checkpoints written before the training core knew tasks (commit e3c1de0: the loaders' old
state-dict layouts, the trainer's `best_val_ppl`) resume and continue to the losses the old code
trained to. tests/data/before_tasks holds a language-model and a ViT checkpoint of step 2 that
e3c1de0 wrote, with its losses of steps 1-4 (losses.json); the language model used the 512-piece
tokenizer beside them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, TINY, losses
from megatron_lax.config import load_config
from megatron_lax.data import tokens as data
from megatron_lax.config import DataConfig
from megatron_lax.train import make_trainer

BEFORE = REPO / "tests" / "data" / "before_tasks"
COMMON = {"train.steps": "4", "train.global_batch": "8", "train.micro_batch": "4", "logging.progress": "false",
          "logging.tensorboard": "false", "logging.log_every": "1", "checkpoint.keep": "2",
          "checkpoint.trust": "true"}  # their RNG states are pickled numpy objects (docs/SAFETY.md)


def old_losses(run: str) -> dict[int, float]:
    return {int(step): loss for step, loss in json.loads((BEFORE / run / "losses.json").read_text())["losses"].items()}


def resume_and_compare(cfg, run: str, rel: float = 1e-6) -> None:
    trainer = make_trainer(cfg)
    summary = trainer.fit()
    resumed = losses(Path(cfg.logging.run_dir))
    assert sorted(resumed) == [3, 4]
    assert resumed == pytest.approx({s: old_losses(run)[s] for s in (3, 4)}, rel=rel, abs=1e-7)
    # the count the old trainer state named "tokens" (images for a ViT) goes on: steps 3-4 add as many again
    old_count = json.loads((BEFORE / run / "step_00000002" / "trainer_state.json").read_text())["tokens"]
    assert summary[trainer.task.unit] == 2 * old_count


def test_a_language_model_checkpoint_from_before_resumes_to_the_old_losses(tmp_path):
    prepared = tmp_path / "prepared"
    data.ensure_prepared(DataConfig(path=str(prepared), raw=str(REPO / "data" / "sample"),
                                    tokenizer=str(BEFORE / "tokenizer")))
    overrides = {**TINY, **COMMON, "model.dim": "16", "model.n_heads": "2", "model.ffn_dim": "32", "model.rank": "4",
                 "model.method": "svd", "model.lax_gate": "identity", "train.eval_tokens": "1024",
                 "optim.lr": "1e-2", "logging.lax_stats_every": "0", "data.path": str(prepared),
                 "data.tokenizer": str(BEFORE / "tokenizer"), "logging.run_dir": str(tmp_path / "run"),
                 "checkpoint.resume": str(BEFORE / "lm" / "step_00000002")}
    resume_and_compare(load_config("llama_tiny", overrides), "lm")


def test_a_vit_checkpoint_from_before_resumes_near_the_old_losses(tmp_path):
    """The same weights and the same images at steps 3-4, but the augmentation is no longer kornia's
    (issue 22: uint8 crops in the workers, mixing on the device), so the losses agree to 2%, not bitwise."""
    overrides = {**COMMON, "model.dim": "16", "model.n_layers": "2", "model.n_heads": "2", "model.ffn_dim": "32",
                 "model.rank": "4", "data.path": str(REPO / "data" / "fashion_mnist_sample"), "data.val_images": "64",
                 "augment.mixup": "0.8", "augment.random_erasing": "0.25", "logging.run_dir": str(tmp_path / "run"),
                 "checkpoint.resume": str(BEFORE / "vit" / "step_00000002")}
    resume_and_compare(load_config(str(BEFORE / "vit" / "config.yaml"), overrides), "vit", rel=0.02)
