"""The study's pieces: cells, the paired table, the probe's items, the teacher-forced answer loss."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO
from megatron_lax import finetune_eval
from megatron_lax.experiments import finetune_study
from megatron_lax.config import ModelConfig
from megatron_lax.models.llama import LlamaLax
from megatron_lax.data.tokenizer import load_tokenizer


def test_cells_name_a_method_and_a_rank_with_alpha_twice_the_rank():
    assert finetune_study.cell("lax_linear_projection_r4") == ("lax_linear_projection_r4", {
        "lora.lax_gate": "linear", "lora.lax_latent": "projection", "lora.rank": "4", "lora.alpha": "8"})
    assert finetune_study.cell("full") == ("full", {"finetune.full": "true"})
    with pytest.raises(ValueError, match="unknown cell"):
        finetune_study.cell("lax_dense_r1")


def write(out, name, seed, accuracy, loss, trainable=10):
    path = out / name / f"seed{seed}" / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"seed": seed, "trainable": trainable,
                                "files": [{"accuracy": accuracy, "answer_loss": loss}]}))


def test_table_reports_each_seed_s_difference_from_lora_at_the_same_rank(tmp_path):
    for seed, (lora, lax) in enumerate([(0.10, 0.15), (0.20, 0.20), (0.30, 0.25)]):
        write(tmp_path, "lora_r1", seed, lora, 2.0)
        write(tmp_path, "lax_linear_r1", seed, lax, 2.0 - 0.1 * (seed + 1))
    write(tmp_path, "full", 0, 0.9, 0.5, trainable=1000)
    lines = finetune_study.table(tmp_path).splitlines()
    assert lines[2].startswith("| lora_r1 | 3 | 10 | 20.0 ± 10.0 |  |  | 2.000 ± 0.000 |")
    # differences +5, 0, -5 points: mean 0.0, sd 5.0, better on 1 of 3 with 1 tie; loss -0.1, -0.2, -0.3
    assert lines[3] == ("| lax_linear_r1 | 3 | 10 | 20.0 ± 5.0 | 0.0 ± 5.0 | 1/3 (ties 1) | 1.800 ± 0.100 | "
                        "-0.200 ± 0.100 | 3/3 |")
    assert lines[4].startswith("| full | 1 | 1,000 | 90.0 |")


def test_probe_items_cover_every_operand_pair_of_the_task():
    items = finetune_study.probe_items(12, 6)
    assert len(items) == 2 * 11 * 11 + 5 * 5
    assert ("Hugo kept 6 boxes of 4 stamps each in the shed, ", "6 x 4 =", "24") in items


def test_answer_loss_scores_the_tokens_where_the_answer_is_computed():
    tok = load_tokenizer(str(REPO / "tokenizer" / "sample"))
    assert finetune_eval.answer_char_span("10 - 7 = 3. The answer is 3.", "3") == (9, 10)
    assert finetune_eval.answer_char_span("The answer is 12.", "12") == (14, 16)
    model = LlamaLax(ModelConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=48, vocab_size=tok.vocab_size), init_seed=0)
    records = [{"instruction": "q", "output": "10 - 7 = 3. The answer is 3.", "answer": "3"},
               {"instruction": "q", "output": "4 x 5 = 20. The answer is 20.", "answer": 20}]
    with torch.no_grad():
        losses = finetune_eval.teacher_forced(model.eval(), tok, records)
    assert losses["answer_tokens"] == 3  # "3", then "2" "0": the tokenizer splits digits, its "▁" is not scored
    assert 0 < losses["answer_loss"] and 0 < losses["response_loss"]


def test_tune_chooses_by_exact_match_on_the_selection_wording_and_looks_past_a_winning_edge(tmp_path, monkeypatch):
    """Rates 1e-3/3e-3/1e-2 on the first seed, 3e-2 added because the edge 1e-2 won there; the two best
    go on to the second seed, and the higher mean exact match wins (3e-2 is best on seed 100 alone, 1e-2
    over both). Every run is scored on the selection file alone, never on the config's test files."""
    accuracy = {(1e-3, 100): 0.2, (3e-3, 100): 0.3, (1e-2, 100): 0.5, (3e-2, 100): 0.55,
                (1e-2, 101): 0.5, (3e-2, 101): 0.35}
    calls = []

    def fake_run_one(config, overrides, run_dir, full_lr):
        lr, seed = float(overrides["optim.lr"]), int(overrides["train.seed"])
        calls.append((lr, seed, overrides["finetune.test_json"], overrides["finetune.base"]))
        return {"lr": lr, "seed": seed, "val_loss": 0.1, "seconds": 0,
                "files": [{"file": "select.json", "accuracy": accuracy[(lr, seed)], "answer_loss": 1.0,
                                                "response_loss": 0.5}]}

    monkeypatch.setattr(finetune_study, "run_one", fake_run_one)
    tune = lambda: finetune_study.tune("c.yaml", tmp_path, [finetune_study.cell("lora_r4")], [1e-3, 3e-3, 1e-2], [],
                                       [100, 101], finalists=2, base="bases/base0", extra={"train.steps": "300"},
                                       select="select.json")
    chosen = tune()
    assert chosen == {"lora_r4": 1e-2} and finetune_study.chosen_rates(tmp_path) == {"lora_r4": 1e-2}
    assert sorted(calls) == sorted((lr, seed, "select.json", "bases/base0") for lr, seed in accuracy)
    with pytest.raises(SystemExit, match="no chosen rate for lax_linear_r4"):
        finetune_study.run("c.yaml", tmp_path / "cells", [1], [finetune_study.cell("lax_linear_r4")], 1e-3,
                           lrs=finetune_study.chosen_rates(tmp_path))
    calls.clear()  # a second call reads the finished runs back instead of running them again
    assert tune() == chosen and calls == []
    old = tmp_path / "lora_r4" / "lr0.01" / "seed100" / "result.json"  # a run of the held-out-loss protocol
    old.write_text(json.dumps({**json.loads(old.read_text()), "files": []}))
    with pytest.raises(SystemExit, match="not on select.json alone"):
        tune()


def test_tune_breaks_a_tie_in_exact_match_by_the_lower_answer_loss(tmp_path, monkeypatch):
    scores = {3e-3: (0.2, 1.0), 1e-2: (0.4, 0.5), 3e-2: (0.4, 0.3), 9e-2: (0.1, 2.0)}
    monkeypatch.setattr(finetune_study, "run_one", lambda config, overrides, run_dir, full_lr: {
        "lr": float(overrides["optim.lr"]), "seed": 100, "val_loss": 0.1, "seconds": 0, "files": [
            {"file": "s.json", "response_loss": 0.5, **dict(zip(("accuracy", "answer_loss"), scores[float(overrides["optim.lr"])]))}]})
    assert finetune_study.tune("c.yaml", tmp_path, [finetune_study.cell("lora_r1")], [3e-3, 1e-2, 3e-2], [], [100],
                               finalists=2, select="s.json") == {"lora_r1": 3e-2}


def test_run_over_bases_gives_every_seed_on_every_base_before_the_next_seed(tmp_path, monkeypatch):
    calls = []

    def fake_run_one(config, overrides, run_dir, full_lr):
        calls.append((overrides["finetune.base"], int(overrides["train.seed"]), overrides["lora.rank"]))
        return {"lr": 0.01, "seed": int(overrides["train.seed"]), "val_loss": 0.1, "seconds": 0, "files": []}

    monkeypatch.setattr(finetune_study, "run_one", fake_run_one)
    plan = [finetune_study.cell("lora_r1"), finetune_study.cell("lora_r4")]
    finetune_study.run("c.yaml", tmp_path, [1, 2], plan, 1e-3, bases=["b/base1", "b/base2"])
    assert calls == [(base, seed, rank) for seed in (1, 2) for base in ("b/base1", "b/base2") for rank in ("1", "4")]
    assert (tmp_path / "base2" / "lora_r4" / "seed1" / "result.json").is_file()
    assert sorted(finetune_study.read_study(tmp_path)) == ["base1", "base2"]
    with pytest.raises(SystemExit, match="share a folder name"):
        finetune_study.run("c.yaml", tmp_path, [1], plan, 1e-3, bases=["a/base1", "b/base1"])


def hits_with_effect(rng, theirs, points: float):
    """`theirs` with about `points` (a fraction) more problems right (or fewer, when negative)."""
    draw = rng.random(theirs.shape)
    if points >= 0:
        return theirs | (draw < points / (1 - theirs.mean()))
    return theirs & (draw >= -points / theirs.mean())


def test_the_hierarchical_bootstrap_counts_the_spread_between_bases_that_a_seeds_only_one_understates():
    """Three bases, seven seeds each, 300 problems. A base-level effect of +20, -10 and +15 points (the
    direction flips on one base) looks like an effect to a bootstrap that pools the 21 runs as seeds; one
    that resamples bases holds zero, as does Student's t over the three base means. An effect of +15,
    +12, +18 on every base stays one."""
    import numpy as np
    rng = np.random.default_rng(0)
    theirs = [rng.random((7, 300)) < 0.4 for _ in range(3)]
    flipping = [hits_with_effect(rng, t, e) for t, e in zip(theirs, (0.20, -0.10, 0.15))]
    d = [o.astype(float) - t for o, t in zip(flipping, theirs)]
    mean, low, high = finetune_study.hierarchical_bootstrap(d)
    assert 0.03 < mean < 0.14 and low < 0 < high
    flat_mean, flat_low, flat_high = finetune_study.paired_bootstrap(np.concatenate(flipping), np.concatenate(theirs))
    assert 0 < flat_low and high - low > 2 * (flat_high - flat_low)
    t_low, t_high = finetune_study.t_interval([x.mean() for x in d])
    assert t_low < 0 < t_high
    steady = [hits_with_effect(rng, t, e) for t, e in zip(theirs, (0.15, 0.12, 0.18))]
    mean, low, high = finetune_study.hierarchical_bootstrap([o.astype(float) - t for o, t in zip(steady, theirs)])
    assert 0.08 < low < mean < high < 0.22


def test_the_pooled_table_reports_every_comparison_over_bases_and_per_base(tmp_path):
    """LaX-LoRA is +10 points on bases 1 and 3 and +2 on base 2, on both seeds of each: pooled +7.3, the
    hierarchical bootstrap above zero, but Student's t over three base means (0.10, 0.02, 0.10: sd 0.0462)
    wide enough to hold zero, so no effect."""
    def put(base, name, seed, right, lr):
        path = tmp_path / base / name / f"seed{seed}" / "result.json"
        path.parent.mkdir(parents=True)
        hits = [1] * right + [0] * (100 - right)
        path.write_text(json.dumps({"seed": seed, "lr": lr, "trainable": 1, "files": [
            {"file": "data/x/test_templates.json", "n": 100, "accuracy": right / 100, "answer_loss": 1.0,
             "response_loss": 0.5, "hits": hits}]}))

    for base, delta in (("base1", 10), ("base2", 2), ("base3", 10)):
        for seed in (1, 2):
            put(base, "lora_r4", seed, 30 + seed, 0.01)
            put(base, "lax_identity_r4", seed, 30 + seed + delta, 0.03)
    study = finetune_study.read_study(tmp_path)
    text = finetune_study.pooled_table(study)
    assert "| lax_identity_r4 | 0.03 | 3 x 2/2/2 | 38.8 ± 4.6 | 41.5 ± 0.7 / 33.5 ± 0.7 / 41.5 ± 0.7 |" in text
    half = 4.303 * 0.0461880 / 3 ** 0.5
    row = next(line for line in text.splitlines() if line.startswith("| lax_identity_r4 − lora_r4 | 3 x 2/2/2 | +7.3 |"))
    low = float(row.split("|")[4].strip(" []").split(",")[0])
    assert low > 0 and row.endswith(f"| [{100 * (0.22 / 3 - half):+.1f}, {100 * (0.22 / 3 + half):+.1f}] | 3 / 0 | "
                                    f"6 / 0 | no | +0.000 |")
    assert "| lax_identity_r4 − lora_r4 | base2 | 2 | +2.0 | [" in text and "| [+2.0, +2.0] | 2 / 0 |" in text
    assert finetune_study.main(["table", str(tmp_path)]) == 0  # the CLI picks the pooled table for a study of bases


def test_the_paired_bootstrap_separates_a_real_difference_from_noise():
    import numpy as np
    rng = np.random.default_rng(0)
    theirs = rng.random((6, 300)) < 0.4
    better = theirs | (rng.random((6, 300)) < 0.3)  # about +18 points on every seed
    mean, low, high = finetune_study.paired_bootstrap(better, theirs)
    assert 0.1 < low < mean < high
    noise = rng.random((6, 300)) < 0.4  # the same rate, drawn independently
    mean, low, high = finetune_study.paired_bootstrap(noise, theirs)
    assert low < 0 < high
    assert finetune_study.sign_test([0.1] * 8) == (8, 0, 2 / 2 ** 8)
    assert finetune_study.sign_test([0.1, -0.1, 0.0]) == (1, 1, 1.0)


def test_the_effects_table_calls_an_effect_only_where_the_interval_excludes_zero(tmp_path):
    def put(name, seed, hits, lr, response_loss=0.5):
        path = tmp_path / name / f"seed{seed}" / "result.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"seed": seed, "lr": lr, "trainable": 1, "files": [
            {"file": "data/x/test_templates.json", "n": len(hits), "accuracy": sum(hits) / len(hits),
             "answer_loss": 1.0, "response_loss": response_loss, "hits": hits}]}))

    for seed in range(4):
        put("lora_r4", seed, [1] * 20 + [0] * 80, 0.01, response_loss=0.5 + 0.1 * seed)
        put("lax_identity_r4", seed, [1] * 20 + [0] * 80, 0.03)  # the same problems right: no effect
        put("full", seed, [1] * 90 + [0] * 10, 0.001)  # +70 points on every seed
    text = finetune_study.effects_table(finetune_study.read_results(tmp_path))
    assert "test_templates.json (100 problems)" in text
    assert "| lax_identity_r4 | 0.03 | 4 | 20.0 ± 0.0 | 1.000 ± 0.000 | 0.500 ± 0.000 |" in text
    # LoRA's response loss is 0.5, 0.6, 0.7, 0.8 over the seeds: LaX's (0.5) is 0.15 lower on average, on 3 of 4
    assert "| no | 0.000 ± 0.000 (0/4, p 1.000) | -0.150 ± 0.129 (3/4, p 0.250) |" in text
    assert "| lax_identity_r4 − lora_r4 | 4 | +0.0 | [+0.0, +0.0] | [+0.0, +0.0] | 0 / 0 (p 1.000) | no |" in text
    assert "| full − lora_r4 | 4 | +70.0 |" in text and "4 / 0 (p 0.125) | yes |" in text


def test_an_effect_needs_the_t_interval_over_seeds_to_exclude_zero_as_well():
    """Per-seed differences +19, -5, +18, -1, -5: the t interval over 5 seeds is wide and holds zero."""
    low, high = finetune_study.t_interval([19, -5, 18, -1, -5])
    assert low < 0 < high and high - low == pytest.approx(2 * 2.776 * 12.2556 / 5 ** 0.5, rel=1e-4)
    assert finetune_study.t_interval([1.0, 1.2, 0.8]) == pytest.approx((1 - 4.303 * 0.2 / 3 ** 0.5,
                                                                          1 + 4.303 * 0.2 / 3 ** 0.5))


def test_the_template_study_config_names_the_shipped_task():
    from pathlib import Path

    from megatron_lax.config import load_config
    cfg = load_config(str(REPO / "configs" / "finetune_templates.yaml"), {})
    f = cfg.finetune
    assert all((REPO / p).is_file() for p in [f.train_json, *f.test_json])
    assert [Path(p).stem for p in f.test_json] == ["test_templates", "test_pairs", "test_both"]
    assert not f.keep_best and f.num_beams == 1 and not f.train_on_inputs


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("base", ["missing", "payload_bin"])
def test_probe_on_a_bad_base_is_one_line_and_runs_nothing(tmp_path, capsys, base):
    import json as json_module

    import torch

    from megatron_lax.experiments.finetune_study import main
    folder, marker = tmp_path / "base", tmp_path / "marker"
    if base == "payload_bin":
        folder.mkdir()
        (folder / "config.json").write_text(json_module.dumps({
            "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 128, "vocab_size": 512}))
        torch.save({"model.embed_tokens.weight": _Payload(marker)}, folder / "pytorch_model.bin")
    assert main(["probe", "--base", str(folder)]) == 2 and not marker.exists()
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    if base == "payload_bin":
        assert "--trust-checkpoint" in err
