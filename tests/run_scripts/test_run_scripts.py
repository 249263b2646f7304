"""The launch paths users type: the DeepSpeed launcher and bash on the run scripts, and a two-node
torchrun rendezvous on this machine."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY, as_cli, free_port, losses, run_command

SHRINK = {**TINY, "train.token_budget": "0", "train.steps": 3, "logging.log_every": 1, "checkpoint.every": 0,
          "train.eval_every": 0}


def launcher_env(**extra) -> dict:
    bin_dir = str(Path(sys.executable).parent)
    return {"PATH": bin_dir + os.pathsep + os.environ["PATH"], "PYTHON": sys.executable, **extra}


def test_deepspeed_launcher_runs_the_1b_script_shrunk(prepared_sample, tmp_path):
    env = launcher_env(DATA=str(prepared_sample), RUN_DIR=str(tmp_path / "run"))
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    result = run_command([deepspeed, "--master_port", str(free_port()), "run_scripts/pretrain_1b.sh",
                          *as_cli(SHRINK)], env=env)
    assert "cola + LaX (identity)" in result.stdout + result.stderr  # the script's default variant
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]


def test_bash_script_launches_torchrun_and_user_arguments_win(prepared_sample, tmp_path):
    env = launcher_env(ENGINE="ddp", NPROC_PER_NODE="2", MASTER_PORT=str(free_port()), METHOD="svd", GATE="linear",
                       DATA=str(prepared_sample), RUN_DIR=str(tmp_path / "run"))
    run_command(["bash", "run_scripts/pretrain_60m.sh", *as_cli(SHRINK), "--optim.lr", "0.005"], env=env)
    from megatron_lax.config import load_config
    cfg = load_config(str(tmp_path / "run" / "config.yaml"))
    assert (cfg.parallel.engine, cfg.model.method, cfg.model.lax_gate) == ("ddp", "svd", "linear")
    assert cfg.optim.lr == 0.005 and cfg.optim.grad_clip == 0.5 and cfg.optim.warmup_ratio == 0.2


def test_two_nodes_rendezvous_on_localhost(prepared_sample, tmp_path):
    port = free_port()
    args = ["-m", "megatron_lax.train", "--config", "llama_tiny",
            *as_cli({**SHRINK, "data.path": prepared_sample, "logging.run_dir": tmp_path / "run",
                     "parallel.engine": "ddp"})]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(rank), "--rdzv_backend", "c10d", "--rdzv_id", "two-nodes",
                               "--rdzv_endpoint", f"127.0.0.1:{port}", *args],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "on 2 rank(s)" in "".join(outputs)
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]


@pytest.mark.parametrize("scale", ["60m", "130m", "350m", "1b"])
def test_each_script_runs_under_bash_and_python(scale):
    """bash hands over to the launcher (here ENGINE=single: plain python), which runs the same file
    as Python; --help reaches the trainer's argument parser."""
    result = run_command(["bash", f"run_scripts/pretrain_{scale}.sh", "--help"], env=launcher_env(ENGINE="single"))
    assert "--model.lax_gate" in result.stdout
