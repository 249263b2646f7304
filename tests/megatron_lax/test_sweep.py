"""The LR sweep (successive halving with a divergence detector) and the multi-seed reproduction driver."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from conftest import TINY, losses
from megatron_lax.config import load_config
from megatron_lax.sweep import log_spaced, parse_lrs, rung_steps, successive_halving

STEPS = 8


def tiny(prepared, **extra):
    values = {**TINY, "data.path": str(prepared), "model.method": "svd", "model.lax_gate": "identity",
              "train.steps": str(STEPS), "logging.log_every": "1", "logging.lax_stats_every": "0"}
    values.update({k.replace("__", "."): str(v) for k, v in extra.items()})
    return load_config("llama_tiny", values)


def test_grids_and_rungs():
    assert log_spaced(1e-3, 1e-1, 3) == [1e-3, 1e-2, 1e-1]
    assert parse_lrs("3e-3,1e-3,3e-3", None) == [1e-3, 3e-3]
    assert parse_lrs(None, "1e-3:8e-3:4") == [1e-3, 2e-3, 4e-3, 8e-3]
    assert rung_steps(489, 3) == [122, 244, 489]


def test_sweep_drops_diverged_rates_and_its_winner_is_an_ordinary_complete_run(prepared_sample, tmp_path):
    result = successive_halving(tiny(prepared_sample), [3e-3, 1e-2, 50.0], tmp_path / "sweep", rungs=2, eta=3,
                                log=lambda _: None)
    by_lr = result["results"]
    assert result["rungs"] == [4, 8]
    assert by_lr["50"]["4"] == math.inf  # diverged, stopped before the first pause
    assert len(losses(tmp_path / "sweep" / "lr_50")) < 4
    finals = {lr: v["8"] for lr, v in by_lr.items() if "8" in v}
    assert list(finals) == [f"{result['best_lr']:g}"]  # only the better of the two survivors continued
    assert by_lr[f"{result['best_lr']:g}"]["4"] == min(v["4"] for v in by_lr.values())
    # paused at step 4 and resumed: the same losses as one uninterrupted run at that rate
    from megatron_lax.train import Trainer
    plain = tiny(prepared_sample, optim__lr=result["best_lr"], logging__run_dir=tmp_path / "plain")
    Trainer(plain).fit()
    swept = losses(tmp_path / "sweep" / f"lr_{result['best_lr']:g}")
    assert swept == pytest.approx(losses(tmp_path / "plain"), rel=1e-6)
    # a second call trains nothing and gives the same answer
    again = successive_halving(tiny(prepared_sample), [3e-3, 1e-2, 50.0], tmp_path / "sweep", rungs=2, eta=3,
                               log=lambda _: None)
    assert again == result


def test_reproduce_reports_mean_and_spread_and_shares_equal_runs(prepared_sample, tmp_path):
    from megatron_lax.reproduce import main
    plan = {"out": str(tmp_path / "out"), "lrs": [3e-3, 1e-2], "rungs": 2, "eta": 2, "seeds": [0, 1],
            "config": {"preset": "llama_tiny", **{s: {} for s in ("model", "data", "train", "logging")}},
            "variants": {"svd": {"model": {"method": "svd"}},
                         "svd_lax": {"model": {"method": "svd", "lax_gate": "identity"}, "base": "svd"},
                         "svd_again": {"model": {"method": "svd", "lowrank_init": "auto"}}}}
    for key, value in {**TINY, "data.path": str(prepared_sample), "train.steps": "6", "logging.lax_stats_every": "0"}.items():
        section, name = key.split(".")
        plan["config"][section][name] = value
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    assert main(["--plan", str(tmp_path / "plan.yaml"), "--variants", "svd,svd_lax,svd_again"]) == 0
    results = {r["variant"]: r for r in json.loads(next((tmp_path / "out").glob("results-*.json")).read_text())}
    for r in results.values():
        assert len(r["val_ppl"]) == 2 and r["min"] <= r["mean"] <= r["max"] and r["std"] >= 0
    assert results["svd_again"]["runs"] == results["svd"]["runs"]  # same settings, same runs
    assert results["svd_again"]["val_ppl"] == results["svd"]["val_ppl"]
    table = next((tmp_path / "out").glob("results-*.md")).read_text()
    assert "vs svd" in table and "(n=2)" in table
    assert main(["--plan", str(tmp_path / "plan.yaml"), "--variants", "nope"]) == 2


def test_run_key_ignores_what_does_not_shape_a_pretraining_run():
    from megatron_lax.reproduce import run_key
    cfg = load_config("llama_micro", {})
    key = run_key(cfg)
    cfg.lora.rank, cfg.finetune.epochs, cfg.optim.lr, cfg.train.seed = 4, 9, 0.5, 7
    assert run_key(cfg) == key  # finished runs stay found when fine-tuning options change
    cfg.model.rank = 16
    assert run_key(cfg) != key


def test_quickstart_trains_the_reproductions_svd_lax_run():
    """README command 1 prints a figure docs/RESULTS.md can be checked against: same settings."""
    from conftest import REPO
    from megatron_lax.reproduce import load_plan, variant_config
    plan = variant_config(load_plan(REPO / "configs/reproduce_small.yaml"), "svd_lax").to_dict()
    quickstart = load_config(str(REPO / "configs/quickstart.yaml"), {}).to_dict()
    quickstart["optim"]["lr"] = plan["optim"]["lr"]  # the swept rate (docs/RESULTS.md)
    for section in ("model", "optim", "data", "train", "parallel"):
        assert quickstart[section] == plan[section], section
