"""Configs: presets, YAML, command-line overrides, and a clear error for every bad configuration."""
from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_lax.config import Config, ConfigError, load_config

BAD = [
    ({"model.lax_gate": "sigmoid", "model.method": "svd"}, "model.lax_gate 'sigmoid' is unknown"),
    ({"model.method": "svd", "model.rank": "600"}, "rank 600 is larger than min(d_in, d_out) = 512"),
    ({"model.method": "svd", "model.rank": "128", "model.mlp_rank": "2000"}, "MLP rank 2000 is larger"),
    ({"model.n_heads": "7"}, "model.dim 512 is not divisible by model.n_heads 7"),
    ({"model.method": "dense", "model.lax_gate": "identity"}, "needs a low-rank model.method"),
    ({"model.method": "tucker"}, "model.method 'tucker' is unknown"),
    ({"model.lax_modules": "q,qkv", "model.method": "svd"}, "unknown projections ['qkv']"),
    ({"model.rank": "many"}, "command line: model.rank"),
    ({"modle.rank": "8"}, "unknown section 'modle'"),
    ({"model.rnak": "8"}, "unknown field model.rnak"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_configurations_fail_clearly(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config("llama_60m", overrides)
    assert message in str(error.value)


def test_yaml_file_with_preset_and_command_line_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: llama_130m\nmodel:\n  method: cola\n  lax_gate: dense\noptim:\n  lr: 0.02\n")
    cfg = load_config(str(path), {"optim.lr": "3e-3", "model.lax_modules": "q,k"})
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.rank) == (768, 12, 256)
    assert cfg.model.method == "cola" and cfg.model.lax_gate == "dense"
    assert cfg.optim.lr == 3e-3 and cfg.model.lax_modules == ["q", "k"]
    assert cfg.train.steps == 20_000 and cfg.optim.warmup_steps == 4_000


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config(str(tmp_path / "missing.yaml"))


def test_cli_help_lists_every_field_and_errors_are_one_line(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "megatron_lax.info", "--help"], capture_output=True,
                               text=True, check=True).stdout
    for section, value in Config().to_dict().items():
        for key in value:
            assert f"--{section}.{key}" in help_text
    bad = subprocess.run([sys.executable, "-m", "megatron_lax.info", "--config", "llama_60m", "--model.method", "svd",
                          "--model.lax_gate", "fancy"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: model.lax_gate 'fancy' is unknown "
                                               "(choose from none, identity, linear, dense, tensor)"]


def test_info_json_reports_table5_row():
    import json
    out = subprocess.run([sys.executable, "-m", "megatron_lax.info", "--config", "llama_1b", "--model.method", "svd",
                          "--json"], capture_output=True, text=True, check=True).stdout
    row = json.loads(out)
    assert round(row["params"] / 1e6) == 609 and round(row["memory_gb"], 2) == 4.54
    assert row["flops_per_token"] > 6 * row["params"] * 0.5


@pytest.mark.parametrize("yaml_text,message", [
    ("optim:\n  lr: [1, 2]\n", "optim.lr: expected a number, got list [1, 2]"),
    ("train:\n  steps: 2.5\n", "train.steps: expected an integer, got float 2.5"),
    ("train:\n  compile: 3\n", "train.compile: expected true or false, got int 3"),
    ("data:\n  path: {a: 1}\n", "data.path: expected a string, got dict {'a': 1}"),
    ("model:\n  lax_modules: {q: 1}\n", "model.lax_modules: expected a list, got dict {'q': 1}"),
    ("checkpoint:\n  resume: null\n", "checkpoint.resume: expected a string, got null"),
])
def test_yaml_values_of_the_wrong_type_fail_at_load(tmp_path, yaml_text, message):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert str(error.value) == f"{path}: {message}"


def test_yaml_values_of_a_compatible_type_are_converted(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1\ntrain:\n  steps: 100.0\n  token_budget: 1000000\nmodel:\n  attn_rank: null\n"
                    "finetune:\n  add_bos: true\n")
    cfg = load_config(str(path))
    assert (cfg.optim.lr, cfg.train.steps, cfg.train.token_budget) == (1.0, 100, "1000000")
    assert isinstance(cfg.optim.lr, float) and cfg.model.attn_rank is None and cfg.finetune.add_bos == "true"


def test_compile_under_zero3_is_refused_in_one_line():
    """ZeRO-3's parameter-gathering hooks are excluded from compilation, an error in a fullgraph block."""
    from megatron_lax.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="^train.compile does not run under ZeRO-3"):
        load_config("llama_tiny", {"train.compile": "true", "parallel.engine": "deepspeed", "parallel.zero_stage": "3"})
    load_config("llama_tiny", {"train.compile": "true", "parallel.engine": "deepspeed", "parallel.zero_stage": "2"})


OUT_OF_RANGE = [("model", "n_heads", 0, "at least 1"), ("data", "seq_len", 0, "at least 1"),
                ("logging", "log_every", 0, "at least 1"), ("model", "n_layers", 0, "at least 1"),
                ("checkpoint", "every", -1, "at least 0"), ("checkpoint", "keep", 0, "at least 1"),
                ("checkpoint", "keep", -2, "at least 1"), ("train", "max_nonfinite", 0, "at least 1"),
                ("train", "eval_every", -2, "at least 0"), ("optim", "warmup_steps", -5, "at least -1"),
                ("model", "dim", 0, "at least 1"), ("optim", "warmup_ratio", 2.0, "between 0 and 1")]


@pytest.mark.parametrize("section,key,value,allowed", OUT_OF_RANGE)
def test_a_value_out_of_range_in_a_config_file_is_one_line_from_train(tmp_path, capsys, section, key, value,
                                                                       allowed):
    from megatron_lax.train import main
    path = tmp_path / "run.yaml"
    path.write_text(f"preset: llama_tiny\n{section}:\n  {key}: {value}\n")
    assert main(["--config", str(path), "--logging.run_dir", str(tmp_path / "run")]) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [f"error: {section}.{key} must be {allowed}, got {value}"]
    assert not (tmp_path / "run").exists()


def test_an_integer_too_large_to_be_a_number_is_one_line(capsys):
    from megatron_lax.train import main
    assert main(["--config", "llama_tiny", "--train.steps", "1e1000"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: command line: train.steps: expected an integer, got '1e1000' (not a finite number)"]


def test_a_config_file_that_is_not_text_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=f"{path}: cannot be read"):
        load_config(str(path))
