"""The plan (python -m megatron_lax.plan) checked against what really happens, not against itself:

- its activation formula (models/llama.py block_saved_bytes, each format's count in its own file)
  equals the bytes a real forward pass leaves for backward, counted by RetainedActivations (saved
  tensors, checkpointed blocks' inputs, the low-rank mode's kept latents), for every format and gate,
  each checkpointing mode, two shapes, fp32 and bf16;
- its parameter, gradient and optimizer bytes per rank equal the engines' real tensors after a step,
  on 3 gloo ranks (uneven shards) for DDP, FSDP2 and DeepSpeed ZeRO-1/2/3 (its flat buffers and
  partitions), fp32, bf16-mixed and bf16-pure, in one launch (DeepSpeed's first start builds an op);
- the command prints a table and a verdict, and refuses bad input in one line.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, as_cli, free_port, run_command
from megatron_lax.config import load_config
from megatron_lax.method.formats import make_linear, projection_saved_bytes
from megatron_lax.models.llama import LlamaLax, block_saved_bytes
from megatron_lax.training.introspection import RetainedActivations, block_activation_bytes

SHAPES = [{"model.dim": "64", "model.n_heads": "2", "model.ffn_dim": "128", "model.rank": "16"},
          {"model.dim": "48", "model.n_heads": "3", "model.ffn_dim": "80", "model.rank": "8"}]
VARIANTS = [("dense", "none", {}), ("svd", "none", {}), ("cola", "none", {}), ("svd", "identity", {}),
            ("cola", "linear", {}), ("cola", "dense", {"model.lax_gate_init": "small"}), ("svd", "tensor", {}),
            ("svd", "dense", {"model.lax_norm": "false"}), ("cola", "identity", {"model.only_latent_act": "true"})]


@pytest.mark.parametrize("variant", range(len(VARIANTS)), ids=[f"{m}-{g}{'-' + ''.join(e) if e else ''}"
                                                                 for m, g, e in VARIANTS])
def test_block_formula_equals_the_saved_tensors(variant):
    """Each variant at one of two shapes (alternating), fp32 and bf16."""
    method, gate, extra = VARIANTS[variant]
    shape = SHAPES[variant % 2]
    for dtype in (torch.float32, torch.bfloat16):
        cfg = load_config("llama_tiny", {**shape, "model.method": method, "model.lax_gate": gate,
                                         "model.vocab_size": "64", **extra}).model

        def build(n_layers):
            cfg.n_layers = n_layers
            return LlamaLax(cfg, init_seed=None)

        for mode in ("none", "block", "lowrank"):
            measured = block_activation_bytes(build, lambda b: torch.zeros(b, 24, dtype=torch.long), 24, mode, dtype)
            cfg.n_layers = 4
            assert block_saved_bytes(cfg, 2, mode, dtype.itemsize, flash=False) == measured, (dtype, mode)


@pytest.mark.parametrize("gate", ["none", "identity", "tensor"])
def test_tensor_train_formula_equals_the_saved_tensors(gate):
    """One TT projection (two and three cores a side), block 2 (it crosses), fp32 and bf16."""
    cfg = load_config("vit_micro", {"model.method": "tt", "model.lax_gate": gate}).model
    for dims in ([8, 12, 12, 8], [4, 6, 4, 8, 6, 2]):
        cfg.tt_attn_dims = dims
        d = int(torch.tensor(dims[:len(dims) // 2]).prod())
        for dtype in (torch.float32, torch.bfloat16):
            linear = make_linear(cfg, "q", d, d, 2).to(dtype)

            def retained(n):
                x = torch.randn(n, d, dtype=dtype, requires_grad=True)
                prev = torch.randn(n, linear.rank, dtype=dtype, requires_grad=True) if gate != "none" else None
                with RetainedActivations(linear) as counter:
                    y, _ = linear(x, prev)
                return counter.retained_bytes(y)

            expected = projection_saved_bytes(cfg, "q", d, d, 2, "none", dtype.itemsize)
            assert (retained(16) - retained(8)) / 8 == expected, (dims, dtype)


def test_saved_tensor_hooks_agree_with_the_retained_count():
    """With checkpointing off, what autograd packs for backward is all a forward leaves alive."""
    cfg = load_config("llama_tiny", {**SHAPES[0], "model.method": "cola", "model.lax_gate": "dense",
                                     "model.vocab_size": "64", "model.n_layers": "2"}).model
    model = LlamaLax(cfg, init_seed=None)
    with RetainedActivations(model) as counter:
        logits = model(torch.zeros(2, 24, dtype=torch.long))
    assert counter.saved_tensor_bytes() > 0
    assert counter.retained_bytes(logits) == counter.saved_tensor_bytes()


def test_engines_model_states_per_rank_equal_the_plan(tmp_path):
    script = Path(__file__).parent / "parallel" / "plan_states.py"
    specs = ["ddp", "fsdp", "fsdp:bf16-pure", "ddp:bf16-pure", "zero1:bf16-mixed", "zero2", "zero3:bf16-mixed",
             "zero3:bf16-pure"]
    run_command([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_addr",
                 "127.0.0.1", "--master_port", str(free_port()), str(script), str(tmp_path), *specs], timeout=600)
    rows = [json.loads(line) for f in tmp_path.glob("rank*.jsonl") for line in f.read_text().splitlines()]
    assert sorted((r["spec"], r["rank"]) for r in rows) == sorted((s, rank) for s in specs for rank in range(3))
    for r in rows:
        assert r["real"] == r["plan"], r
    fsdp = {r["rank"]: r["real"]["parameters"] for r in rows if r["spec"] == "fsdp"}
    assert fsdp[0] > fsdp[2]  # uneven shards: the plan follows them rank by rank


def test_plan_command_prints_the_table_and_the_largest_micro_batch(capsys):
    from megatron_lax.plan import main
    overrides = {"model.method": "cola", "model.lax_gate": "identity", "parallel.engine": "fsdp",
                 "train.precision": "bf16-pure", "train.token_budget": "paper", "train.micro_batch": "16"}
    assert main(["--config", "llama_1b", "--gpus", "8", "--gpu", "a100-40", *as_cli(overrides)]) == 0
    out = capsys.readouterr().out
    assert "| optimizer states + master weights |" in out and "fits: margin +" in out
    assert "largest micro-batch that fits" in out and "GPU-hours" in out


def test_verdict_names_what_would_fit_and_bad_input_is_one_line(capsys):
    from megatron_lax.plan import main, verdict
    cfg = load_config("llama_1b", {"model.method": "cola", "parallel.engine": "fsdp", "train.precision": "bf16-pure",
                                   "train.micro_batch": "64", "train.global_batch": "512"})
    fits, line = verdict(cfg, 8, "a100-40")
    assert not fits and "would fit" in line and "lowrank up to 64" in line and "\n" not in line
    assert verdict(cfg, 8, "h200")[0]
    assert main(["--config", "llama_60m", "--gpu", "v99"]) == 2
    assert "--gpu 'v99' is unknown" in capsys.readouterr().err
    assert main(["--config", "vit_micro"]) == 2  # a family that does not count its activations
    assert "model.arch vit does not count its activations (Family.activation_rows" in capsys.readouterr().err


def test_the_recipe_refuses_a_job_that_cannot_fit_in_one_line():
    """run_scripts/pretrain_1b.sh's Python side (what every rank runs): the plan first, before any data."""
    import os
    import subprocess
    env = {**os.environ, "PLAN_GPU": "a100-40", "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "run_scripts/pretrain_1b.sh", "--train.micro_batch", "64"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    line, = result.stderr.strip().splitlines()
    assert line.startswith("error: does not fit:") and "lowrank up to" in line and "MEMORY_PLAN=ignore" in line
