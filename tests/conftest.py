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
    from megatron_lax import data
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
