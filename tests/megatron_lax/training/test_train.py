"""End-to-end training on the shipped sample with the real trainer (single process, CPU, fp32)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from megatron_lax.config import load_config
from megatron_lax.train import make_trainer

VARIANTS = [("dense", "none", 3e-3), ("svd", "none", 3e-3), ("svd", "identity", 1e-2),
            ("cola", "none", 3e-3), ("cola", "identity", 1e-2)]


@pytest.mark.parametrize("method,gate,lr", VARIANTS)
def test_training_lowers_validation_loss(tiny_overrides, tmp_path, method, gate, lr):
    cfg = load_config("llama_tiny", tiny_overrides(tmp_path, model__method=method,
                                                   model__lax_gate=gate, optim__lr=lr, train__steps=40))
    trainer = make_trainer(cfg)
    before = trainer.validate()["val_loss"]
    summary = trainer.fit()
    assert summary["val_loss"] < before - 1.0, (before, summary["val_loss"])


def test_run_directory_holds_metrics_tensorboard_and_a_checkpoint(tiny_overrides, tmp_path):
    overrides = tiny_overrides(tmp_path, model__method="svd", model__lax_gate="linear",
                               train__steps=6, train__eval_every=3, logging__log_every=2,
                               logging__tensorboard="true", logging__lax_stats_every=3)
    args = [a for k, v in overrides.items() for a in (f"--{k}", v)]
    result = subprocess.run([sys.executable, "-m", "megatron_lax.train", "--config", "llama_tiny", *args],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "validation perplexity" in result.stderr + result.stdout
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert all({"step", "loss", "lr", "tokens", "grad_norm", "tokens_per_s", "mfu"} <= set(r) for r in train)
    assert "lax_gate/q/1" in train[0]
    assert any("lax_rms/q/1/crossing" in r for r in records)
    assert [r["step"] for r in val] == [3, 6] and all(r["val_ppl"] > 1 for r in val)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000006"

    evaluated = subprocess.run([sys.executable, "-m", "megatron_lax.evaluate", "--checkpoint", str(tmp_path),
                                "--json"], capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    report = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert report["tokens"] == val[-1]["val_tokens"]
    assert report["val_ppl"] == pytest.approx(val[-1]["val_ppl"], rel=1e-6)


@pytest.mark.parametrize("mode", ["packed", "paper"])
def test_gradient_accumulation_matches_one_big_micro_batch(tiny_overrides, tmp_path, mode):
    """Token-weighted normalisation: 2 x 4 sequences accumulate to exactly the 1 x 8 step."""
    losses = []
    for micro in (4, 8):
        cfg = load_config("llama_tiny", tiny_overrides(tmp_path / str(micro), data__mode=mode,
                                                       train__micro_batch=micro, model__method="svd",
                                                       model__lax_gate="identity", optim__lr=1e-2,
                                                       train__steps=4))
        trainer = make_trainer(cfg)
        losses.append([trainer.train_step()["loss"] for _ in range(4)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-pure"])
def test_bf16_precisions_on_one_process(tiny_overrides, tmp_path, precision):
    cfg = load_config("llama_tiny", tiny_overrides(tmp_path, model__method="cola", model__lax_gate="identity",
                                                   train__precision=precision, train__steps=3))
    trainer = make_trainer(cfg)
    dtypes = {p.dtype for p in trainer.engine.base_model.parameters()}
    assert dtypes == ({torch.bfloat16} if precision == "bf16-pure" else {torch.float32})
    first = trainer.train_step()["loss"]
    trainer.train_step()
    assert math.isfinite(trainer.train_step()["loss"]) and first > 8.0
