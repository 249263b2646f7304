"""Shared fixtures: the shipped sample, tokenized once per test session into a temporary directory."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Small shapes that train in seconds on two CPU cores; every test that trains uses them.
TINY = {
    "model.dim": "64", "model.n_layers": "2", "model.n_heads": "2", "model.ffn_dim": "128", "model.rank": "16",
    "data.seq_len": "32", "train.global_batch": "8", "train.micro_batch": "4", "train.eval_tokens": "4096",
    "logging.progress": "false", "logging.tensorboard": "false",
}


@pytest.fixture(scope="session")
def prepared_sample(tmp_path_factory) -> Path:
    """data/sample tokenized with tokenizer/sample (the repo's defaults)."""
    from megatron_lax.data import tokens as data
    from megatron_lax.config import DataConfig

    path = tmp_path_factory.mktemp("prepared") / "sample"
    cfg = DataConfig(path=str(path), raw=str(REPO / "data" / "sample"), tokenizer=str(REPO / "tokenizer" / "sample"))
    data.ensure_prepared(cfg)
    return path


def make_tiny_overrides(prepared: Path, run_dir: Path, **extra) -> dict:
    """Overrides for a tiny training run on the prepared sample, plus `extra` (model__method="svd")."""
    values = dict(TINY)
    values.update({"data.path": str(prepared), "logging.run_dir": str(run_dir)})
    values.update({k.replace("__", "."): str(v) for k, v in extra.items()})
    return values


@pytest.fixture
def tiny_overrides(prepared_sample):
    """tiny_overrides(run_dir, **extra) -> a dict of overrides for a tiny run on the prepared sample."""
    return lambda run_dir, **extra: make_tiny_overrides(prepared_sample, run_dir, **extra)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_cli(overrides: dict) -> list[str]:
    return [arg for key, value in overrides.items() for arg in (f"--{key}", str(value))]


def run_command(command: list[str], timeout: int = 600, env: dict | None = None):
    """Runs a command from the repo root; fails the test with the output's tail if it fails."""
    import os
    import subprocess
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def torchrun(module_args: list[str], nproc: int = 2, timeout: int = 600):
    """`torchrun --nproc_per_node N -m megatron_lax.train ...` on a free local port."""
    import sys
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *module_args]
    return run_command(command, timeout)


def losses(run_dir: Path) -> dict[int, float]:
    import json
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="session", autouse=True)
def checkpoint_key_dir(tmp_path_factory):
    """The key that signs checkpoints (parallel.trust) lives in a test folder, not the user's home;
    the commands the tests start inherit it."""
    import os
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
    return os.environ["XDG_STATE_HOME"]
