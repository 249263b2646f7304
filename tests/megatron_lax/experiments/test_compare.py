"""The run comparison: Table-5-style rows with exact numbers, the PNG, and damaged inputs."""
from __future__ import annotations

import json

import pytest

from megatron_lax.experiments import compare
from megatron_lax.config import dump_yaml, load_config
from megatron_lax.models.llama import count_parameters, memory_gb

SHAPE = {"model.vocab_size": 8192, "model.rank": 64}


def write_run(directory, method="svd", gate="none", val_ppls=(60.0, 36.25), extra_lines=(), **overrides):
    """A run directory as the trainer leaves it: config.yaml and metrics.jsonl (4 train steps of
    1000 tokens, validation every 2 steps with the given perplexities)."""
    cfg = load_config("llama_tiny", {**SHAPE, "model.method": method, "model.lax_gate": gate, **overrides})
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(dump_yaml(cfg))
    lines = []
    for step in range(1, 5):
        lines.append(json.dumps({"step": step, "loss": 9.0 - step, "lr": 1e-3, "tokens": 1000 * step,
                                 "grad_norm": 1.0, "tokens_per_s": 500.0}))
        if step % 2 == 0:
            ppl = val_ppls[step // 2 - 1]
            lines.append(json.dumps({"step": step, "tokens": 1000 * step, "val_loss": 3.0, "val_ppl": ppl,
                                     "val_tokens": 4096}))
    (directory / "metrics.jsonl").write_text("\n".join([*lines, *extra_lines]) + "\n")
    return directory, cfg


def rows(table: str) -> dict[str, list[str]]:
    """The table's body rows keyed by their first cell."""
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    return {row[0]: row[1:] for row in cells}


@pytest.fixture
def three_runs(tmp_path):
    dense, dense_cfg = write_run(tmp_path / "dense", "dense", val_ppls=(50.0, 34.06))
    svd, svd_cfg = write_run(tmp_path / "svd", "svd", val_ppls=(60.0, 36.25))
    lax, lax_cfg = write_run(tmp_path / "lax", "svd", "identity", val_ppls=(55.0, 33.54))
    return [dense, svd, lax], [dense_cfg, svd_cfg, lax_cfg]


def test_labels_come_from_the_config(three_runs):
    runs = compare.load_runs(three_runs[0])
    assert [r.label for r in runs] == ["Full-rank", "SVD, r=64", "SVD + LaX (identity), r=64"]
    cola = load_config("llama_tiny", {**SHAPE, "model.method": "cola", "model.lax_gate": "dense",
                                      "model.attn_rank": 32})
    assert compare.variant_label(cola.model) == "CoLA + LaX (dense), r=32/64 (attn/mlp)"


def test_table_pairs_lax_with_its_base_model_by_default(three_runs):
    paths, cfgs = three_runs
    table = compare.comparison_table(compare.load_runs(paths))
    assert table.splitlines()[0] == "| variant | tokens | val PPL | params (M) | mem (GB) |"
    body = rows(table)
    lax_params = count_parameters(cfgs[2].model)
    assert body["SVD + LaX (identity), r=64"] == ["4.0K", "33.54 (-2.71)", f"{lax_params / 1e6:.1f}",
                                                 f"{memory_gb(lax_params):.2f}"]
    assert body["SVD, r=64"][1] == "36.25"  # a base model has no delta
    assert body["Full-rank"][1] == "34.06"
    dense_params = count_parameters(cfgs[0].model)
    assert body["Full-rank"][2:] == [f"{dense_params / 1e6:.1f}", f"{memory_gb(dense_params):.2f}"]


def test_explicit_base_by_label_or_directory(three_runs):
    paths, _ = three_runs
    runs = compare.load_runs(paths)
    for base in ("Full-rank", str(paths[0])):
        body = rows(compare.comparison_table(runs, base=base))
        assert body["Full-rank"][1] == "34.06"
        assert body["SVD, r=64"][1] == "36.25 (+2.19)"
        assert body["SVD + LaX (identity), r=64"][1] == "33.54 (-0.52)"
    with pytest.raises(compare.RunError, match="matches no run"):
        compare.comparison_table(runs, base="nonexistent")


def test_cli_writes_png_and_prints_table(three_runs, tmp_path, capsys):
    paths, _ = three_runs
    png = tmp_path / "out" / "curves.png"
    assert compare.main([*map(str, paths), "--output", str(png), "--labels", "full", "svd", "lax",
                         "--base", "svd"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    body = rows(capsys.readouterr().out.split("\n\n")[0])
    assert body["lax"][1] == "33.54 (-2.71)" and body["full"][1] == "34.06 (-2.19)"


def test_malformed_lines_are_skipped_and_counted(tmp_path, capsys):
    path, _ = write_run(tmp_path / "run", extra_lines=['{"step": 5, "loss": 3.', "[1, 2]", "not json"])
    run = compare.load_run(path)
    assert run.malformed_lines == 3
    assert [r["step"] for r in run.train] == [1, 2, 3, 4]
    assert compare.main([str(path), "--output", str(tmp_path / "c.png")]) == 0
    assert "skipped 3 malformed line(s)" in capsys.readouterr().err


def test_resumed_run_keeps_the_latest_record_of_each_step(tmp_path):
    again = [json.dumps({"step": 4, "tokens": 4000, "val_loss": 3.4, "val_ppl": 30.0, "val_tokens": 4096}),
             json.dumps({"step": 3, "loss": "nan", "tokens": 3000})]
    run = compare.load_run(write_run(tmp_path / "run", extra_lines=again)[0])
    assert [r["step"] for r in run.val] == [2, 4] and run.final_score == 30.0
    assert len(run.train) == 4 and run.train[2]["loss"] != run.train[2]["loss"]  # "nan" read as NaN


@pytest.mark.parametrize("damage, message", [
    (lambda d: None, "no such run directory"),
    (lambda d: d.mkdir(), "no metrics.jsonl"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("")), "no config.yaml"),
])
def test_missing_runs_give_one_line_errors(tmp_path, capsys, damage, message):
    damage(tmp_path / "bad")
    assert compare.main([str(tmp_path / "bad"), "--output", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "c.png").exists()


def test_run_without_records_is_an_error(tmp_path):
    path, _ = write_run(tmp_path / "run")
    (path / "metrics.jsonl").write_text("garbage\n")
    with pytest.raises(compare.RunError, match="no training or validation records"):
        compare.load_run(path)


def test_best_picks_the_lowest_final_validation_perplexity(tmp_path, capsys):
    from megatron_lax.experiments.compare import main
    for name, ppl in (("a", 40.0), ("b", 31.5), ("c", float("nan"))):
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text(dump_yaml(load_config("llama_60m", {"model.vocab_size": "32000"})))
        (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": 10, "val_loss": 3.0,
                                                           "val_ppl": ppl}) + "\n")
    assert main([str(tmp_path / n) for n in "abc"] + ["--best"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "b")


def test_latent_rms_table_averages_each_kind_over_projections_and_blocks(tmp_path):
    from megatron_lax.experiments.compare import latent_rms_table, load_run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_yaml(load_config("llama_60m", {"model.vocab_size": "32000"})))
    records = [{"step": 1, "tokens": 10, "loss": 5.0},
               {"step": 0, "lax_rms/q/1/latent": 1.0, "lax_rms/up/2/latent": 3.0, "lax_rms/q/1/out": 0.5}]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    table = latent_rms_table([load_run(run_dir, label="r")])
    assert "| r | 0 | - | - | 2.000 | 0.500 |" in table


def test_bytes_that_are_not_utf8_in_metrics_are_skipped_and_counted(tmp_path, capsys):
    path, _ = write_run(tmp_path / "run")
    with open(path / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 9, "loss": \xff\xfe}\n')
    assert compare.main([str(path), "--output", str(tmp_path / "c.png")]) == 0
    assert "skipped 1 malformed line(s)" in capsys.readouterr().err
