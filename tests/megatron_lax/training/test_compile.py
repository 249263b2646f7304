"""train.compile is a first-class path: a compiled run with evaluation, LaX statistics and a resume
compiles a fixed, small set of graphs (one per block kind and mode) and never recompiles after them.
Dynamo's recompiles are reproduced on the CPU with a backend that runs the graphs eagerly and counts them."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from megatron_lax.config import load_config
from megatron_lax.train import make_trainer

SAMPLE = Path(__file__).resolve().parents[3] / "data" / "fashion_mnist_sample"


class CountingBackend:
    """A torch.compile backend that runs each graph eagerly and counts the graphs it is handed."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


@pytest.fixture
def counting_compile(monkeypatch):
    torch._dynamo.reset()
    backend = CountingBackend()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    # A recompile past the first graphs is an error, not a silent slowdown.
    with torch._dynamo.config.patch(recompile_limit=4):
        yield backend
    torch._dynamo.reset()


def run_twice(preset: str, overrides: dict, run_dir: Path) -> None:
    """Trains to train.stop_after (a pause, after validation and statistics), then resumes to the end."""
    make_trainer(load_config(preset, {**overrides, "logging.run_dir": str(run_dir)})).fit()
    make_trainer(load_config(preset, {**overrides, "logging.run_dir": str(run_dir),
                                      "checkpoint.resume": "auto", "train.stop_after": "0"})).fit()


def test_a_compiled_12_layer_lax_llama_with_evaluation_statistics_and_resume_compiles_four_graphs(
        tiny_overrides, tmp_path, counting_compile):
    overrides = tiny_overrides(tmp_path, model__method="cola", model__lax_gate="dense", model__n_layers=12,
                               model__dim=32, model__ffn_dim=64, model__rank=8, train__compile="true",
                               train__steps=4, train__stop_after=2, train__eval_every=2, train__eval_tokens=200,
                               logging__lax_stats_every=1, logging__log_every=1)
    run_twice("llama_tiny", overrides, tmp_path / "run")
    records = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "lax_rms" in line]
    assert len(records) == 5 and all('"lax_rms/q/11/crossing"' in r for r in records)  # steps 0-4, resumed too
    # training and evaluation, each for block 0 (no incoming latent) and the blocks that cross
    assert counting_compile.graphs == 4


def test_a_compiled_vit_with_uneven_validation_batches_compiles_four_graphs(tmp_path, counting_compile):
    overrides = {"model.dim": 32, "model.n_layers": 3, "model.n_heads": 2, "model.ffn_dim": 64, "model.rank": 8,
                 "model.patch_size": 7, "model.method": "svd", "model.lax_gate": "tensor", "data.path": str(SAMPLE),
                 "data.train_images": 64, "data.val_images": 11,  # 4 + 4 + 3: a short last batch
                 "train.steps": 4, "train.stop_after": 2, "train.global_batch": 8, "train.micro_batch": 4,
                 "train.eval_every": 2, "train.compile": "true", "logging.log_every": 1,
                 "logging.lax_stats_every": 1, "logging.progress": "false", "logging.tensorboard": "false"}
    run_twice("vit_micro", overrides, tmp_path / "run")
    assert counting_compile.graphs == 4
