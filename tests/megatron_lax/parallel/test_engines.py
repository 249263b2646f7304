"""Every engine, for real, on 2 CPU processes (gloo), one torchrun per engine (train_runs.py runs
several trainings in it): the first losses match a single process with the same global batch; a
checkpoint written mid-run resumes onto the same losses (a DDP one also in a single process, 2 -> 1
ranks); a non-finite gradient is skipped exactly as
a single process skips it; the checkpoint consolidates to the single process's weights; BF16 runs
follow FP32.

Tolerances. FP32 losses: a relative 1e-5; resumed losses: 1e-6 of the uninterrupted run (observed
on 2 CPU processes: bit-identical). Weights: a relative 1e-4 per tensor (Frobenius norm; observed
up to 1.2e-6). The engines sum the same per-token gradients in another order (an all-reduce or
reduce-scatter of two partial sums instead of one accumulation), which moves weights by a few ulps
per step, and Adam's normalisation magnifies that for gradients near zero, so weights are compared
per tensor, not per element. BF16 losses: 5e-3 of FP32 (observed up to 3e-4); a run that failed to
update would be 3% off by step 3.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, losses
from megatron_lax.parallel import trust
from train_runs import launch, run_all

STEPS = 4
LAX = {**TINY, "model.method": "svd", "model.lax_gate": "identity", "train.steps": STEPS, "train.micro_batch": 2,
       "logging.log_every": 1, "checkpoint.every": 2, "optim.lr": 1e-2, "logging.lax_stats_every": 0}
COLA_DENSE = {"model.method": "cola", "model.lax_gate": "dense", "checkpoint.every": 0}
BF16_TOLERANCE = 5e-3


def records(run_dir: Path) -> dict[int, dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def final_checkpoint(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{STEPS:08d}"


def trusted(engine: dict) -> dict:
    """DeepSpeed's files are pickles: another run directory's are read only when trusted."""
    return {"checkpoint.trust": "true"} if engine.get("parallel.engine") == "deepspeed" else {}


def standard_runs(prepared: Path, out: Path, **engine) -> list[dict]:
    """An uninterrupted run, a resume of it from step 2, and a run whose step-2 gradient is NaN."""
    base = {**LAX, "data.path": prepared, **engine}
    return [{"overrides": {**base, "logging.run_dir": out / "full"}},
            {"overrides": {**base, "logging.run_dir": out / "resumed", **trusted(engine),
                           "checkpoint.resume": out / "full" / "checkpoints" / "step_00000002"}},
            {"overrides": {**base, "logging.run_dir": out / "nan", "checkpoint.every": 0}, "nan_steps": [2]}]


@pytest.fixture(scope="module")
def reference(prepared_sample, tmp_path_factory) -> Path:
    """The same runs in this process with the single engine, plus a CoLA + dense-gate run."""
    out = tmp_path_factory.mktemp("single")
    runs = standard_runs(prepared_sample, out, **{"parallel.engine": "single"})
    runs.append({"overrides": {**LAX, **COLA_DENSE, "data.path": prepared_sample, "logging.run_dir": out / "cola"}})
    run_all([runs[0], runs[2], runs[3]])
    return out


def assert_same_weights(got: dict, expected: dict, rel: float = 1e-4) -> None:
    assert got.keys() == expected.keys()  # wrapping (FSDP, DeepSpeed, checkpointing) renames nothing
    for name, value in expected.items():
        difference = torch.linalg.vector_norm(got[name].float() - value.float())
        assert difference <= rel * torch.linalg.vector_norm(value.float()) + 1e-8, name


def extra_run(prepared: Path, out: Path, name: str, **settings) -> dict:
    return {"overrides": {**LAX, "data.path": prepared, "logging.run_dir": out / name, "checkpoint.every": 0,
                          **settings}}


USER_DEEPSPEED_CONFIG = {  # our recipe's AdamW and clipping; a scheduler that would wreck the run if it ran
    "train_batch_size": 999, "zero_optimization": {"stage": 2}, "gradient_clipping": 0.5,
    "optimizer": {"type": "AdamW", "params": {"lr": 1.0, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01,
                                              "torch_adam": True}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 1.0, "warmup_max_lr": 1.0, "warmup_num_steps": 1}},
}

ENGINES = {  # name: (engine settings, extra runs in the same launch as bf16 precisions)
    "ddp": ({"parallel.engine": "ddp"}, ["bf16-mixed"]),
    "fsdp": ({"parallel.engine": "fsdp"}, ["bf16-mixed", "bf16-pure"]),
    "zero1": ({"parallel.engine": "deepspeed", "parallel.zero_stage": 1}, ["bf16-mixed"]),
    "zero2": ({"parallel.engine": "deepspeed", "parallel.zero_stage": 2}, ["bf16-mixed"]),
    "zero3": ({"parallel.engine": "deepspeed", "parallel.zero_stage": 3}, ["bf16-pure"]),
}


@pytest.mark.parametrize("name", ENGINES)
def test_engine_matches_single_process_resumes_skips_and_consolidates(prepared_sample, reference, tmp_path, name):
    from megatron_lax.parallel import consolidated_state_dict
    engine, precisions = ENGINES[name]
    runs = standard_runs(prepared_sample, tmp_path, **engine)
    runs += [extra_run(prepared_sample, tmp_path, p, **engine, **{"train.precision": p}) for p in precisions]
    if name == "fsdp":  # LaX latents cross FSDP-wrapped, checkpointed blocks (true: the old spelling of block)
        runs.append(extra_run(prepared_sample, tmp_path, "cola_checkpointed", **engine, **COLA_DENSE,
                             **{"train.activation_checkpointing": "true"}))
    if name in ("fsdp", "zero3"):  # low-rank recompute under FSDP2 and under ZeRO-3's gathered parameters
        runs.append(extra_run(prepared_sample, tmp_path, "cola_lowrank", **engine, **COLA_DENSE,
                             **{"train.activation_checkpointing": "lowrank"}))
    if name == "zero2":  # a user's own DeepSpeed JSON; its scheduler must not fight the trainer's LR
        user_json = tmp_path / "user_ds.json"
        user_json.write_text(json.dumps(USER_DEEPSPEED_CONFIG))
        runs.append(extra_run(prepared_sample, tmp_path, "user_json", **engine,
                             **{"parallel.deepspeed_config": user_json}))
    if name == "zero1":  # DeepSpeed's pickled files: the run's own checkpoint resumes without the flag, a copy not
        runs.append(extra_run(prepared_sample, tmp_path, "own", **engine))
        again = {"train.steps": STEPS + 1, "checkpoint.resume": "auto"}
        runs.append({**extra_run(prepared_sample, tmp_path, "copied", **engine, **again),
                     "copy": [tmp_path / "own", tmp_path / "copied"]})
        runs.append(extra_run(prepared_sample, tmp_path, "own", **engine, **again))
    launch(runs, tmp_path, nproc=2)

    if name == "zero1":
        step = final_checkpoint(tmp_path / "copied")
        assert (tmp_path / "copied" / "error_rank_0.txt").read_text().startswith(
            f"{step / 'deepspeed'} is a DeepSpeed checkpoint")
        assert max(losses(tmp_path / "copied")) == STEPS  # nothing trained from the copy
        assert max(losses(tmp_path / "own")) == STEPS + 1  # the run's own checkpoint resumed
    single, got = losses(reference / "full"), losses(tmp_path / "full")
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == pytest.approx(single[s], rel=1e-5) for s in got)

    resumed = losses(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4]
    assert all(resumed[s] == pytest.approx(got[s], rel=1e-6) for s in resumed)
    if name == "ddp":  # 2 ranks -> 1: the DDP checkpoint resumes in a single process
        run_all([{"overrides": {**LAX, "data.path": prepared_sample, "logging.run_dir": tmp_path / "one",
                                "parallel.engine": "single",
                                "checkpoint.resume": tmp_path / "full" / "checkpoints" / "step_00000002"}}])
        one = losses(tmp_path / "one")
        assert sorted(one) == [3, 4] and all(one[s] == pytest.approx(got[s], rel=1e-5) for s in one)

    skipped, single_skipped = records(tmp_path / "nan"), records(reference / "nan")
    assert [skipped[s]["skipped"] for s in sorted(skipped)] == [0, 1, 0, 0]
    assert all(skipped[s]["loss"] == pytest.approx(single_skipped[s]["loss"], rel=1e-5) for s in skipped)

    with trust.trusting(tmp_path):  # our own DeepSpeed checkpoints
        assert_same_weights(consolidated_state_dict(final_checkpoint(tmp_path / "full")),
                            consolidated_state_dict(final_checkpoint(reference / "full")))

    for precision in precisions:
        low = losses(tmp_path / precision)
        assert sorted(low) == list(range(1, STEPS + 1))
        assert all(low[s] == pytest.approx(single[s], rel=BF16_TOLERANCE) for s in low), (precision, low, single)
    if name == "fsdp":
        # bf16-pure keeps bf16 weights; bf16-mixed keeps fp32 master weights
        assert {v.dtype for v in consolidated_state_dict(final_checkpoint(tmp_path / "bf16-pure")).values()} \
            == {torch.bfloat16}
        assert {v.dtype for v in consolidated_state_dict(final_checkpoint(tmp_path / "bf16-mixed")).values()} \
            == {torch.float32}
        cola, wrapped = losses(reference / "cola"), losses(tmp_path / "cola_checkpointed")
        assert cola.keys() == wrapped.keys() and all(wrapped[s] == pytest.approx(cola[s], rel=1e-5) for s in cola)
    if name in ("fsdp", "zero3"):
        cola, lowrank = losses(reference / "cola"), losses(tmp_path / "cola_lowrank")
        assert cola.keys() == lowrank.keys() and all(lowrank[s] == pytest.approx(cola[s], rel=1e-5) for s in cola)
    if name == "zero2":
        user = losses(tmp_path / "user_json")
        assert user.keys() == single.keys() and all(user[s] == pytest.approx(single[s], rel=1e-5) for s in user)
    if name == "zero3":
        ds_config = json.loads((tmp_path / "bf16-pure" / "deepspeed_config.json").read_text())
        assert ds_config["bf16"]["bf16_optimizer_states"] and ds_config["zero_optimization"]["stage"] == 3


def test_compiled_checkpointed_blocks_pass_lax_latents():
    """torch.compile per block under activation checkpointing, LaX (CoLA, dense gate): same loss and
    gradients as eager, and the blocks really are compiled (a checkpointed forward compiled the
    other way round compiles nothing, silently)."""
    import torch._dynamo

    from megatron_lax.config import load_config
    from megatron_lax.models.llama import LlamaLax, token_nll
    from megatron_lax.parallel import apply_activation_checkpointing, apply_compile

    cfg = load_config("llama_tiny", {**TINY, **{k: str(v) for k, v in COLA_DENSE.items()}, "model.vocab_size": "128"})
    inputs, targets = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0)).split(1)

    def loss_and_grads(wrap):
        torch.manual_seed(0)
        model = LlamaLax(cfg.model)
        wrap(model)
        nll, _ = token_nll(model(inputs), targets)
        nll.backward()
        return nll.detach(), [p.grad for p in model.parameters()]

    eager = loss_and_grads(lambda model: None)
    for mode in ("block", "lowrank"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = loss_and_grads(lambda model: (apply_compile(model), apply_activation_checkpointing(model, mode)))
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
        assert compiled[0] == pytest.approx(float(eager[0]), rel=1e-5)
        for a, b in zip(compiled[1], eager[1]):  # fused kernels sum in another order: tolerance scaled to the tensor
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))
