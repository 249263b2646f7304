"""Every engine, for real, on 2 CPU processes (gloo): the first losses match a single-process run
with the same global batch, and a checkpoint written mid-run resumes onto the same losses.

Tolerance: fp32 losses agree to a relative 1e-5. The engines sum the same per-token gradients in a
different order (all-reduce / reduce-scatter of two partial sums instead of one accumulation), which
moves the weights by a few ulps per step; after 4 steps that shows in the 7th significant digit.
"""
from __future__ import annotations

import pytest

from conftest import TINY, as_cli, losses, torchrun

STEPS = 4
LAX = {"model.method": "svd", "model.lax_gate": "identity", "train.steps": STEPS, "train.micro_batch": 2,
       "logging.log_every": 1, "checkpoint.every": 2, "optim.lr": 1e-2}


def overrides(prepared, run_dir, **extra) -> list[str]:
    return as_cli({**TINY, **LAX, "data.path": prepared, "logging.run_dir": run_dir, **extra})


@pytest.fixture(scope="module")
def single_losses(prepared_sample, tmp_path_factory):
    from megatron_lax.config import load_config
    from megatron_lax.train import Trainer
    run_dir = tmp_path_factory.mktemp("single")
    values = {**TINY, **LAX, "data.path": str(prepared_sample), "logging.run_dir": str(run_dir)}
    Trainer(load_config("llama_tiny", {k: str(v) for k, v in values.items()})).fit()
    return losses(run_dir)


ENGINES = [("ddp", {}), ("fsdp", {}), ("deepspeed", {"parallel.zero_stage": 1}),
           ("deepspeed", {"parallel.zero_stage": 2}), ("deepspeed", {"parallel.zero_stage": 3})]


@pytest.mark.parametrize("engine,extra", ENGINES, ids=["ddp", "fsdp", "zero1", "zero2", "zero3"])
def test_engine_matches_single_process_and_resumes(prepared_sample, single_losses, tmp_path, engine, extra):
    full = tmp_path / "full"
    torchrun(["-m", "megatron_lax.train", "--config", "llama_tiny",
              *overrides(prepared_sample, full, **{"parallel.engine": engine, **extra})])
    got = losses(full)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(single_losses[step], rel=1e-5)

    resumed = tmp_path / "resumed"
    torchrun(["-m", "megatron_lax.train", "--config", "llama_tiny",
              *overrides(prepared_sample, resumed, **{"parallel.engine": engine, **extra,
                                                      "checkpoint.resume": full / "checkpoints" / "step_00000002"})])
    after = losses(resumed)
    assert sorted(after) == [3, 4]
    for step in after:
        assert after[step] == pytest.approx(got[step], rel=1e-6)


def test_fsdp_with_activation_checkpointing_and_lax_cola_dense_gate(prepared_sample, tmp_path):
    """LaX latents cross checkpointed, FSDP-wrapped blocks: same losses as without either."""
    common = {"model.method": "cola", "model.lax_gate": "dense", "checkpoint.every": 0}
    plain, wrapped = tmp_path / "plain", tmp_path / "wrapped"
    torchrun(["-m", "megatron_lax.train", "--config", "llama_tiny",
              *overrides(prepared_sample, plain, **{**common, "parallel.engine": "ddp"})])
    torchrun(["-m", "megatron_lax.train", "--config", "llama_tiny",
              *overrides(prepared_sample, wrapped, **{**common, "parallel.engine": "fsdp",
                                                      "train.activation_checkpointing": "true"})])
    a, b = losses(plain), losses(wrapped)
    assert a.keys() == b.keys() and all(b[s] == pytest.approx(a[s], rel=1e-5) for s in a)


@pytest.mark.parametrize("engine,precision", [("fsdp", "bf16-mixed"), ("fsdp", "bf16-pure"),
                                              ("deepspeed", "bf16-mixed")])
def test_bf16_precisions_train_on_two_processes(prepared_sample, single_losses, tmp_path, engine, precision):
    """BF16 runs follow the fp32 run closely for the first steps (bf16 has 8 mantissa bits: 5e-2)."""
    torchrun(["-m", "megatron_lax.train", "--config", "llama_tiny",
              *overrides(prepared_sample, tmp_path, **{"parallel.engine": engine, "train.precision": precision,
                                                       "checkpoint.every": 0})])
    got = losses(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == pytest.approx(single_losses[s], rel=5e-2) for s in got)
