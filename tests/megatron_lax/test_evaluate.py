"""`megatron_lax.evaluate` computes in the precision the run validated in during training, so a bf16
run's final validation loss and the evaluation of its checkpoint agree (to 1e-3 relative), on the
single engine (bf16 autocast) and on FSDP2 (bf16 weights)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from conftest import TINY, free_port, run_command

RUN = {**TINY, "model.method": "cola", "model.lax_gate": "identity", "optim.lr": "1e-2", "train.steps": "4",
       "logging.lax_stats_every": "0"}


def final_val_loss(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "val_loss" in r][-1]["val_loss"]


def evaluated(run_dir: Path, precision: str = "run") -> dict:
    from megatron_lax.evaluate import evaluate_checkpoint
    return evaluate_checkpoint(run_dir, precision=precision)


def test_single_engine_bf16_mixed_evaluates_as_it_validated(prepared_sample, tmp_path):
    from megatron_lax.config import load_config
    from megatron_lax.train import make_trainer
    overrides = {**RUN, "data.path": str(prepared_sample), "logging.run_dir": str(tmp_path), "train.precision": "bf16-mixed"}
    make_trainer(load_config("llama_tiny", overrides)).fit()
    result = evaluated(tmp_path)
    assert result["precision"] == "bf16-mixed (bf16 autocast)"
    assert result["val_loss"] == pytest.approx(final_val_loss(tmp_path), rel=1e-3)
    assert evaluated(tmp_path, "fp32")["precision"] == "fp32"


def test_fsdp_bf16_runs_evaluate_as_they_validated(prepared_sample, tmp_path):
    runs = [{"overrides": {**RUN, "data.path": str(prepared_sample), "logging.run_dir": str(tmp_path / p),
                           "parallel.engine": "fsdp", "train.precision": p}} for p in ("bf16-mixed", "bf16-pure")]
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    script = Path(__file__).parent / "parallel" / "train_runs.py"
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]
    run_command([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                 "--master_port", str(free_port()), str(script), str(spec)], env={"PATH": path})
    for precision in ("bf16-mixed", "bf16-pure"):
        result = evaluated(tmp_path / precision)
        assert result["precision"] == f"{precision} (bf16 weights)"
        assert result["val_loss"] == pytest.approx(final_val_loss(tmp_path / precision), rel=1e-3), precision


def test_evaluate_refuses_data_of_another_tokenizer(prepared_sample, tmp_path, capsys):
    from conftest import REPO
    from megatron_lax.data.prepare import prepare
    from megatron_lax.config import load_config
    from megatron_lax.evaluate import main
    from megatron_lax.train import make_trainer
    make_trainer(load_config("llama_tiny", {**RUN, "train.steps": "1", "data.path": str(prepared_sample),
                                       "logging.run_dir": str(tmp_path / "run")})).fit()
    english = tmp_path / "english"
    prepare([REPO / "data" / "sample" / "c4-validation.00000-of-00001.json.gz"], str(REPO / "tokenizer" / "english"),
            english, progress=False)
    capsys.readouterr()
    assert main(["--checkpoint", str(tmp_path / "run"), "--data", str(english)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {english} was prepared with tokenizer ") and \
        "but data.tokenizer is tokenizer/sample" in err[0]
