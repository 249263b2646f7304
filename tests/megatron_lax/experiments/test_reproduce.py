"""reproduce's protocol bookkeeping, with a stand-in trainer whose validation loss is a known function
of the learning rate (no training): the grid grows past a winning edge, a seed's run is kept per rate,
and a run stopped by a signal is never recorded as finished."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from megatron_lax.experiments import reproduce
from megatron_lax.config import dump_yaml

BEST_LR = 4e-3


class StandInTrainer:
    """Writes the run directory's config and returns the summary a finished run would, with a
    validation loss smallest at BEST_LR; `preempt_seeds` end as a signal would end them."""
    preempt_seeds: set = set()

    def __init__(self, cfg, task_class=None):
        self.cfg = cfg

    def fit(self) -> dict:
        run_dir = Path(self.cfg.logging.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(self.cfg))
        (run_dir / "metrics.jsonl").write_text('{"step": 6, "unigram_ppl": 100.0}\n')
        if self.cfg.train.seed in self.preempt_seeds:
            return {"preempted": True, "steps": 3, "checkpoint": str(run_dir / "checkpoints" / "step_00000003")}
        loss = 1.0 + math.log2(self.cfg.optim.lr / BEST_LR) ** 2 + 0.01 * self.cfg.train.seed
        summary = {"val_loss": loss, "val_ppl": math.exp(loss), "steps": 6, "run_dir": str(run_dir)}
        (run_dir / "finished.json").write_text(json.dumps(summary))
        return summary


def plan(lrs, extend_edges=0) -> dict:
    return {"config": {"preset": "llama_micro", "model": {"vocab_size": 256}, "train": {"steps": 6}},
            "lrs": lrs, "extend_edges": extend_edges, "rungs": 1, "seeds": [0, 1, 2],
            "metric": "val_ppl", "variants": {"svd": {"model": {"method": "svd"}}}}


@pytest.fixture
def stand_in(monkeypatch):
    StandInTrainer.preempt_seeds = set()
    for module in ("reproduce", "sweep"):
        monkeypatch.setattr(f"megatron_lax.experiments.{module}.Trainer", StandInTrainer)
    return StandInTrainer


def test_grid_grows_past_a_winning_edge_until_the_choice_is_inside(stand_in, tmp_path):
    result = reproduce.run_variant(plan([1e-3, 2e-3], extend_edges=3), "svd", tmp_path, log=lambda m: None)
    assert result["lrs"] == [1e-3, 2e-3, 4e-3, 8e-3] and result["lr"] == BEST_LR and not result["lr_at_edge"]
    assert sorted(result["values"]) == ["1", "2"]  # only the seeds that took no part in the choice


def test_a_choice_still_at_the_edge_is_flagged(stand_in, tmp_path):
    result = reproduce.run_variant(plan([5e-4, 1e-3]), "svd", tmp_path, log=lambda m: None)
    assert result["lr"] == 1e-3 and result["lr_at_edge"]
    assert "1e-3 (edge)" in reproduce.results_table([result]).replace("0.001", "1e-3")


def test_a_seed_keeps_its_run_per_rate(stand_in, tmp_path):
    first = reproduce.run_variant(plan([5e-4, 1e-3]), "svd", tmp_path, log=lambda m: None)
    second = reproduce.run_variant(plan([5e-4, 1e-3, 2e-3, 4e-3]), "svd", tmp_path, log=lambda m: None)
    assert (first["lr"], second["lr"]) == (1e-3, BEST_LR)
    assert second["values"]["1"] < first["values"]["1"]  # trained again at the new rate, not read back
    assert any(p.name == "seed1_lr0.004" for p in Path(first["runs"]).iterdir())


def test_a_preempted_seed_is_not_recorded_as_finished(stand_in, tmp_path):
    stand_in.preempt_seeds = {2}
    with pytest.raises(RuntimeError, match="run the same command again to resume"):
        reproduce.run_variant(plan([2e-3, 4e-3]), "svd", tmp_path, log=lambda m: None)
    seed2 = next(tmp_path.rglob("seed2"))
    assert not (seed2 / "summary.json").exists()
    stand_in.preempt_seeds = set()
    assert reproduce.run_variant(plan([2e-3, 4e-3]), "svd", tmp_path, log=lambda m: None)["values"].keys() == {"1", "2"}


def result(variant, base, values, sweep_value, depth):
    return {"variant": variant, "base": base, "mean": sum(values) / len(values), "min": min(values),
            "max": max(values), "sweep_seed_value": sweep_value, "depth": depth}


def test_lax_effect_is_each_lax_variant_against_its_own_base():
    results = [result("svd.depth8", None, [100.0, 110.0], 90.0, 8),
               result("svd_lax.depth8", "svd.depth8", [84.0], 99.0, 8),
               result("cola.depth8", None, [80.0], 80.0, 8),
               result("cola_lax.depth8", "cola.depth8", [88.0], 60.0, 8),
               result("svd_lax.depth4", "svd.depth4", [50.0], 50.0, 4)]  # base missing: no point
    depth = lambda r: r["depth"]
    effects = reproduce.lax_effects(results, depth)
    assert set(effects) == {"SVD + LaX", "CoLA + LaX"}
    (x, change, error), = effects["SVD + LaX"]
    assert (x, change) == (8, pytest.approx(-20.0)) and error == pytest.approx(5 / 105 * 100)
    assert effects["CoLA + LaX"][0][1] == pytest.approx(10.0)
    by_sweep_seed = reproduce.lax_effects(results, depth, sweep_seed=True)
    assert by_sweep_seed["SVD + LaX"][0][1:] == (pytest.approx(10.0), 0.0)
    assert by_sweep_seed["CoLA + LaX"][0][1] == pytest.approx(-25.0)
