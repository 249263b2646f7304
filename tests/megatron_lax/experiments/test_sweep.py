"""The LR sweep (successive halving to at least two complete runs, chosen on a selection slice, with
the spike and plateau rules) and the multi-seed reproduction driver (fresh seeds reported, --quick)."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from conftest import TINY, losses
from megatron_lax.config import load_config
from megatron_lax.experiments.sweep import log_spaced, parse_lrs, rung_steps, successive_halving
from megatron_lax.train import make_trainer

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


def test_sweep_trains_two_finalists_to_the_end_and_chooses_on_the_selection_slice(prepared_sample, tmp_path):
    cfg = tiny(prepared_sample, train__select_tokens=2048)
    result = successive_halving(cfg, [3e-3, 1e-2, 50.0], tmp_path / "sweep", rungs=2, eta=3, log=lambda _: None,
                                finalists=2, plateau=-math.inf)  # 8 steps leave every run near the unigram model
    by_lr = result["results"]
    assert result["rungs"] == [4, 8]
    assert by_lr["50"]["4"] == math.inf and result["status"]["50"].startswith("diverged")  # the spike rule fired
    assert len(losses(tmp_path / "sweep" / "lr_50")) < 4  # stopped before the first pause
    finals = {lr: v["8"] for lr, v in by_lr.items() if "8" in v}
    assert sorted(finals) == ["0.003", "0.01"] == sorted(result["finalists"])  # eta 3 keeps one, finalists two
    assert result["best_lr"] == float(min(finals, key=finals.get))  # the lowest selection loss at full length
    assert "selection slice" in result["selected_on"]
    reported = result["reported_val_loss"]
    assert all(reported[lr]["8"] != pytest.approx(finals[lr], abs=1e-6) for lr in finals)  # other tokens
    # paused at step 4 and resumed: the same losses as one uninterrupted run at that rate
    plain = tiny(prepared_sample, optim__lr=result["best_lr"], logging__run_dir=tmp_path / "plain",
                 train__select_tokens=2048)
    summary = make_trainer(plain).fit()
    swept = losses(tmp_path / "sweep" / f"lr_{result['best_lr']:g}")
    assert swept == pytest.approx(losses(tmp_path / "plain"), rel=1e-6)
    assert summary["select_loss"] == pytest.approx(finals[f"{result['best_lr']:g}"], rel=1e-6)
    # a second call trains nothing and gives the same answer
    again = successive_halving(cfg, [3e-3, 1e-2, 50.0], tmp_path / "sweep", rungs=2, eta=3, log=lambda _: None,
                               finalists=2, plateau=-math.inf)
    assert again == result


def fake_runs(monkeypatch, selection: dict, reported: dict, chance: float = 6.0):
    """Replaces training: train_until returns the given selection / reported losses at each pause."""
    import megatron_lax.experiments.sweep as sweep
    trained = []

    def train_until(cfg, lr, stop, out):
        trained.append((lr, stop))
        return {"step": stop, "diverged": False, "chance_loss": chance,
                "select_loss": {str(stop): selection[lr][stop]}, "val_loss": {str(stop): reported[lr][stop]}}
    monkeypatch.setattr(sweep, "train_until", train_until)
    return trained


def test_choice_is_made_at_full_length_not_at_the_last_pause(monkeypatch, tmp_path):
    """Early pauses favour small rates (the LR is still high at half the schedule): the final choice
    is between two complete runs, and the one ahead at the end wins even if it was behind at the pause."""
    cfg = load_config("llama_micro", {"train.steps": "8", "train.select_tokens": "100"})
    selection = {1e-3: {2: 5.5, 4: 5.3, 8: 5.2}, 2e-3: {2: 5.2, 4: 5.0, 8: 4.9},
                 4e-3: {2: 5.3, 4: 5.05, 8: 4.7}, 8e-3: {2: 5.8, 4: 5.6, 8: 5.5}}
    reported = {lr: {s: v - 0.5 * (lr == 2e-3) for s, v in by.items()} for lr, by in selection.items()}
    trained = fake_runs(monkeypatch, selection, reported)
    result = successive_halving(cfg, list(selection), tmp_path, rungs=3, eta=2, log=lambda _: None, finalists=2)
    assert result["finalists"] == ["0.004", "0.002"]
    assert result["best_lr"] == 4e-3  # behind 2e-3 at step 4, ahead at the end; 2e-3 leads on reported tokens
    assert {lr for lr, stop in trained if stop == 8} == {2e-3, 4e-3}


def test_a_rate_stuck_at_the_unigram_plateau_is_stalled_and_never_chosen(monkeypatch, tmp_path):
    """The old detector (loss 10% above the first step's) could not flag a run sitting at the unigram
    level; the plateau rule does, at any pause and at the end."""
    cfg = load_config("llama_micro", {"train.steps": "8", "train.select_tokens": "100"})
    selection = {1e-3: {4: 5.5, 8: 5.4}, 3e-2: {4: 5.96, 8: 5.95}, 6e-2: {4: 6.3, 8: 6.3}}
    fake_runs(monkeypatch, selection, selection, chance=6.0)
    result = successive_halving(cfg, list(selection), tmp_path, rungs=2, eta=1, log=lambda _: None, finalists=3)
    assert result["status"] == {"0.001": "ok", "0.03": "stalled at step 4", "0.06": "stalled at step 4"}
    assert result["finalists"] == ["0.001"] and result["best_lr"] == 1e-3
    every = {lr: {4: 6.2, 8: 6.1} for lr in selection}
    fake_runs(monkeypatch, every, every, chance=6.0)
    with pytest.raises(RuntimeError, match="diverged or stalled"):
        successive_halving(cfg, list(selection), tmp_path, rungs=2, eta=1, log=lambda _: None)


def test_spike_rule_fires_on_a_loss_spike_and_not_on_noise_or_a_plateau():
    from megatron_lax.training.trainer import Trainer
    trainer = object.__new__(Trainer)
    trainer.cfg = load_config("llama_micro", {})

    def fires(sequence):
        """The first step at which the rule fires (None: never), from a fresh detector."""
        trainer.loss_ema, trainer.best_loss_ema = None, math.inf
        return next((i for i, loss in enumerate(sequence) if trainer.diverged(loss)), None)

    healthy = [8.3 - 0.01 * i + 0.15 * (-1) ** i for i in range(300)]
    assert fires(healthy) is None
    assert fires([6.35 + 0.05 * (-1) ** i for i in range(300)]) is None  # the plateau: the sweep's rule, not this
    spike = fires([8.3 - 0.02 * i for i in range(100)] + [9.0] * 30)
    assert spike is not None and 100 <= spike < 130
    assert fires([5.0, float("nan")]) == 1


def test_selection_slice_follows_the_reported_tokens_and_never_overlaps_them(prepared_sample):
    from megatron_lax.data import tokens as data
    sequences = data.Sequences(data.Split(prepared_sample, "validation"), 32, "packed")
    reported = data.validation_sequence_ids(sequences, 4096)
    selection = data.validation_sequence_ids(sequences, 2048, after_tokens=4096)
    assert selection[0] == reported[-1] + 1 and len(selection) == 64
    with pytest.raises(ValueError, match="select_tokens"):
        data.validation_sequence_ids(sequences, 10 ** 9, after_tokens=4096)


def test_reproduce_reports_mean_and_spread_and_shares_equal_runs(prepared_sample, tmp_path):
    from megatron_lax.experiments.reproduce import main
    plan = {"out": str(tmp_path / "out"), "lrs": [3e-3, 1e-2], "rungs": 2, "eta": 2, "seeds": [0, 1, 2],
            "plateau": -1e9, "config": {"preset": "llama_tiny", **{s: {} for s in ("model", "data", "train", "logging")}},
            "variants": {"svd": {"model": {"method": "svd"}},
                         "svd_lax": {"model": {"method": "svd", "lax_gate": "identity"}, "base": "svd"},
                         "svd_again": {"model": {"method": "svd", "lowrank_init": "auto"}}},
            "quick": {"lrs": {"svd": [1e-2, 3e-3], "default": [3e-3]}, "rungs": 1, "seeds": [0, 1], "report": "all"}}
    for key, value in {**TINY, "data.path": str(prepared_sample), "train.steps": "6", "train.select_tokens": "2048",
                       "logging.lax_stats_every": "0"}.items():
        section, name = key.split(".")
        plan["config"][section][name] = value
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    assert main(["--plan", str(tmp_path / "plan.yaml"), "--variants", "svd,svd_lax,svd_again"]) == 0
    results = {r["variant"]: r for r in json.loads(next((tmp_path / "out").glob("results-*.json")).read_text())}
    for r in results.values():
        assert sorted(r["values"]) == ["1", "2"]  # report fresh: the sweep seed took part in the choice
        assert r["min"] <= r["mean"] <= r["max"] and r["std"] >= 0 and not r["sweep_seed_reported"]
        assert len(r["sweep"]["finalists"]) == 2  # both rates trained to the end
    assert results["svd_again"]["runs"] == results["svd"]["runs"]  # same settings, same runs
    assert results["svd_again"]["values"] == results["svd"]["values"]
    table = next((tmp_path / "out").glob("results-*.md")).read_text()
    assert "vs svd" in table and "(n=2)" in table and "stalled" in table
    assert main(["--plan", str(tmp_path / "plan.yaml"), "--variants", "nope"]) == 2
    # --quick: its own grid, seeds and report; the finished runs of the same settings are reused
    runs = sorted(p for p in (tmp_path / "out" / "runs").rglob("metrics.jsonl"))
    stamps = [p.stat().st_mtime_ns for p in runs]
    assert main(["--plan", str(tmp_path / "plan.yaml"), "--quick", "--out", str(tmp_path / "out"),
                 "--variants", "svd"]) == 0
    assert [p.stat().st_mtime_ns for p in runs] == stamps  # nothing trained again
    quick = json.loads((tmp_path / "out" / "results-svd.json").read_text())[0]
    assert sorted(quick["values"]) == ["0", "1"] and quick["sweep_seed_reported"]
    assert quick["values"]["1"] == results["svd"]["values"]["1"]
    assert main(["--plan", str(tmp_path / "plan.yaml"), "--quick", "--out", str(tmp_path / "out"),
                 "--variants", "svd", "--report", "fresh"]) == 0
    assert list(json.loads((tmp_path / "out" / "results-svd.json").read_text())[0]["values"]) == ["1"]


def test_run_key_ignores_what_does_not_shape_a_pretraining_run():
    from megatron_lax.experiments.reproduce import run_key
    cfg = load_config("llama_micro", {})
    key = run_key(cfg)
    cfg.lora.rank, cfg.finetune.epochs, cfg.optim.lr, cfg.train.seed = 4, 9, 0.5, 7
    assert run_key(cfg) == key  # finished runs stay found when fine-tuning options change
    cfg.model.rank = 16
    assert run_key(cfg) != key


def test_quickstart_trains_the_reproductions_svd_lax_run():
    """README command 1 prints a figure docs/RESULTS.md can be checked against: same settings."""
    from conftest import REPO
    from megatron_lax.experiments.reproduce import load_plan, variant_config
    plan = variant_config(load_plan(REPO / "configs/reproduce_small.yaml"), "svd_lax").to_dict()
    quickstart = load_config(str(REPO / "configs/quickstart.yaml"), {}).to_dict()
    quickstart["optim"]["lr"] = plan["optim"]["lr"]  # the swept rate (docs/RESULTS.md)
    for section in ("model", "optim", "data", "train", "parallel"):
        assert quickstart[section] == plan[section], section


def test_the_shipped_plan_chooses_on_a_selection_slice_and_its_quick_protocol_trains_two_rates_to_the_end():
    from conftest import REPO
    from megatron_lax.experiments.reproduce import grid, load_plan, variant_config
    plan = load_plan(REPO / "configs/reproduce_small.yaml")
    for name in plan["variants"]:
        cfg = variant_config(plan, name)  # every study variant resolves
        assert cfg.train.select_tokens > 0 and cfg.train.eval_tokens > 0
    assert plan["finalists"] >= 2 and plan["report"] == "fresh" and len(plan["seeds"]) >= 4
    quick = load_plan(REPO / "configs/reproduce_small.yaml", quick=True)
    assert quick["rungs"] == 1 and quick["out"] != plan["out"]
    for name in quick["default_variants"]:
        assert len(grid(quick, name)) >= 2  # both trained to the end: rungs 1


def test_the_vision_plan_chooses_on_held_out_images_and_trains_the_readme_vit():
    """Every variant of the ViT study resolves, its rates are chosen on held-out training images
    between at least two finalists, the reported seeds score the test images, and its CoLA + LaX
    model under `matched` is the README's ViT (configs/vit_fashion_mnist.yaml)."""
    from conftest import REPO
    from megatron_lax.experiments.reproduce import load_plan, variant_config
    plan = load_plan(REPO / "configs/reproduce_vit_fmnist.yaml")
    for name in plan["variants"]:
        cfg = variant_config(plan, name)
        assert cfg.data.holdout > 0 and cfg.data.eval_split == "val" and cfg.data.train_images == 0
        assert (cfg.model.lowrank_init == "matched") == name.endswith(".matched") or cfg.model.method == "dense"
    assert plan["select"] == {"data": {"eval_split": "holdout"}}
    assert plan["finalists"] >= 2 and plan["report"] == "fresh" and len(plan["seeds"]) >= 4
    readme = load_config(str(REPO / "configs/vit_fashion_mnist.yaml"), {}).to_dict()
    study = variant_config(plan, "cola_lax.matched").to_dict()
    assert readme["model"] == study["model"] and readme["augment"] == study["augment"]
    assert readme["optim"] == {**study["optim"], "lr": readme["optim"]["lr"]}
    quick = load_plan(REPO / "configs/reproduce_vit_fmnist.yaml", quick=True)
    assert quick["out"] != plan["out"] and quick["rungs"] == 1
    for name in quick["default_variants"]:  # the earlier short protocol: quick's config over the plan's
        cfg = variant_config(quick, name)
        assert (cfg.data.train_images, cfg.data.holdout, cfg.model.n_layers, cfg.train.epochs) == (10000, 2000, 6, 2)
        assert (cfg.augment.hflip, cfg.augment.label_smoothing, cfg.model.patch_size) == (0.5, 0.1, 7)
        assert cfg.model.lowrank_init == "matched" and cfg.model.lax_gate_init == "identity"
