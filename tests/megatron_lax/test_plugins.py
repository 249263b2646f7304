"""The plug-in promise: a new low-rank format is one class plus one registry line, and then every
command works on it (train with LaX, resume, evaluate, export, info, compare, a learning-rate sweep).

The toy format below is defined here and nowhere else, so any table of format names that a command
keeps instead of asking the registry fails this test with a KeyError or an unknown-method error."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from megatron_lax.config import ModelConfig, load_config
from megatron_lax.method import FORMATS, Format, register
from megatron_lax.method.lowrank import LatentLinear
from megatron_lax.models import Family
from megatron_lax.tasks.language_modeling import LanguageModeling
from tests.conftest import losses


# --- a toy format: block-diagonal encoder, dense decoder -------------------------------------------

@dataclass
class BlockFields:
    toy_blocks: int = 2  # blockdiag: diagonal blocks of the encoder


class BlockDiagonalLinear(LatentLinear):
    """h = blockdiag(A_1..A_n) x, y = B z: a latent format LaX crosses like any other."""

    def __init__(self, d_in, d_out, rank, blocks, bias=False, **crossing):
        super().__init__(d_in, d_out, rank, None, **crossing)
        self.blocks = blocks
        self.A = nn.Parameter(torch.empty(blocks, rank // blocks, d_in // blocks))
        self.B = nn.Linear(rank, d_out, bias=bias)

    def encode(self, x):
        parts = x.unflatten(-1, (self.blocks, -1))
        return torch.einsum("...ni,noi->...no", parts, self.A).flatten(-2)

    def decode(self, z):
        return self.B(z)

    def init_rules(self, at, init, init_std):
        rules = {f"{at}A": ("normal", 0.1), f"{at}B.weight": ("normal", 0.05)}
        if self.B.bias is not None:
            rules[f"{at}B.bias"] = ("zeros", 0.0)
        return rules


class BlockDiagonal(Format):
    name, label, fields = "blockdiag", "Block-diagonal", BlockFields

    def validate(self, m, shapes):
        super().validate(m, shapes)
        for projection, (d_in, _) in shapes.items():
            if d_in % m.toy_blocks or m.rank_of(projection) % m.toy_blocks:
                raise ValueError(f"model.toy_blocks {m.toy_blocks} must divide {projection}'s width and rank")

    def build(self, cfg, projection, d_in, d_out, bias, activation, crossing):
        return BlockDiagonalLinear(d_in, d_out, cfg.rank_of(projection), cfg.toy_blocks, bias, **crossing)

    def count(self, cfg, projection, d_in, d_out):
        r = cfg.rank_of(projection)
        return r * d_in // cfg.toy_blocks + r * d_out, 2 * (r * d_in // cfg.toy_blocks + r * d_out), r


@pytest.fixture
def toy_format(monkeypatch):
    monkeypatch.setattr(ModelConfig, "__dataclass_fields__", dict(ModelConfig.__dataclass_fields__))  # undone after
    monkeypatch.setitem(FORMATS, "blockdiag", FORMATS.get("blockdiag"))
    register(BlockDiagonal())  # the one line a new format needs
    return "blockdiag"


def _cli(overrides: dict) -> list[str]:
    return [arg for key, value in overrides.items() for arg in (f"--{key}", str(value))]


def test_a_format_defined_in_a_test_trains_resumes_evaluates_exports_and_is_reported(toy_format, tiny_overrides,
                                                                                     tmp_path, capsys):
    from megatron_lax import export, info, train
    from megatron_lax.evaluate import main as evaluate
    from megatron_lax.experiments import compare
    from megatron_lax.loading.ours import load_pretrained
    from megatron_lax.models import build_model, count_parameters

    extra = dict(model__method=toy_format, model__lax_gate="linear", model__toy_blocks=4, train__steps=4,
                 checkpoint__every=2, logging__lax_stats_every=2, logging__log_every=1)
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    assert train.main(_cli(tiny_overrides(straight, **extra))) == 0
    assert train.main(_cli(tiny_overrides(paused, **extra, train__stop_after=2))) == 0
    assert train.main(_cli(tiny_overrides(paused, **extra, checkpoint__resume="auto"))) == 0
    assert losses(paused) == losses(straight) and len(losses(straight)) == 4  # resumed exactly

    cfg = load_config(str(straight / "config.yaml"))
    model = build_model(cfg.model)
    assert isinstance(model.layers[1].attn.q, BlockDiagonalLinear) and model.layers[1].attn.q.lax_gate is not None
    assert count_parameters(cfg.model) == sum(p.numel() for p in model.parameters())

    capsys.readouterr()
    assert evaluate(["--checkpoint", str(straight), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["val_loss"] > 0

    assert export.main(["--checkpoint", str(straight), "--output", str(tmp_path / "export")]) == 0
    exported = load_pretrained(tmp_path / "export")
    assert isinstance(exported.layers[0].mlp.up, BlockDiagonalLinear)

    capsys.readouterr()
    assert info.main(["--config", str(straight / "config.yaml"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["variant"] == "Block-diagonal + LaX (linear)" and row["params"] == count_parameters(cfg.model)

    runs = compare.load_runs([straight, paused])
    assert runs[0].label.startswith("Block-diagonal + LaX (linear), r=16")
    assert compare.main([str(straight), str(paused), "--output", str(tmp_path / "c.png")]) == 0


def test_a_two_rate_sweep_runs_on_a_format_defined_in_a_test(toy_format, tiny_overrides, tmp_path, capsys):
    from megatron_lax.experiments import sweep
    overrides = tiny_overrides(tmp_path / "unused", model__method=toy_format, model__lax_gate="identity",
                               train__steps=4, train__select_tokens=2048)
    assert sweep.main([*_cli(overrides), "--lrs", "1e-3,4e-3", "--rungs", "2", "--plateau=-inf", "--out", str(tmp_path / "sweep")]) == 0
    result = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert result["best_lr"] in (1e-3, 4e-3)


def test_a_format_field_is_validated_and_on_the_command_line(toy_format, capsys):
    from megatron_lax.config import ConfigError
    with pytest.raises(ConfigError, match="toy_blocks 3 must divide"):
        load_config("llama_micro", {"model.method": toy_format, "model.toy_blocks": "3"})
    from megatron_lax import train
    with pytest.raises(SystemExit):
        train.main(["--help"])
    assert "--model.toy_blocks" in capsys.readouterr().out


def test_the_memory_plan_says_in_one_line_what_a_format_without_a_count_lacks(toy_format, capsys):
    from megatron_lax.plan import main, preflight
    args = ["--config", "llama_micro", "--model.method", toy_format]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "model.method blockdiag does not count" in err and "Format.saved_bytes" in err and err.count("\n") == 1
    assert preflight(args, 1, "a100-40") is None  # a launch is not refused for what the plan cannot size


def test_a_format_field_set_for_another_format_is_refused():
    from megatron_lax.config import ConfigError
    with pytest.raises(ConfigError, match="needs model.method tt"):
        load_config("vit_micro", {"model.method": "svd", "model.lax_intra_modules": "q"})


# --- every registered format is reported by compare, info and reproduce ------------------------------

def write_vit_run(directory, method: str):
    """A ViT run directory as the trainer leaves it (config.yaml, two steps and one validation)."""
    from megatron_lax.config import dump_yaml
    gate = "tensor" if FORMATS[method].lowrank else "none"
    cfg = load_config("vit_micro", {"model.method": method, "model.lax_gate": gate, "model.num_classes": "10",
                                    "model.in_channels": "1"})
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(dump_yaml(cfg))
    records = [{"step": 1, "loss": 2.3, "images": 128}, {"step": 2, "loss": 2.1, "images": 256},
               {"step": 2, "images": 256, "val_loss": 2.0, "val_acc1": 30.0, "val_acc5": 80.0}]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return cfg


@pytest.mark.parametrize("method", sorted(FORMATS))
def test_compare_info_and_reproduce_report_every_registered_format(method, tmp_path, capsys):
    from megatron_lax import info
    from megatron_lax.experiments import compare, reproduce
    write_vit_run(tmp_path / method, method)
    label = FORMATS[method].label
    run, = compare.load_runs([tmp_path / method])
    assert run.label.startswith(label)
    assert compare.main([str(tmp_path / method), "--output", str(tmp_path / "c.png")]) == 0
    assert label in capsys.readouterr().out
    assert info.main(["--config", str(tmp_path / method / "config.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["variant"].startswith(label)
    assert reproduce.variant_family_label(f"{method}_lax.depth4") == f"{label} + LaX"


# --- a toy family: token mixer blocks of one projection each, trained as a language model -------------

@dataclass
class MixerFields:
    toy_residual: float = 1.0  # mixer: the residual stream's weight


class MixerLM(nn.Module):
    def __init__(self, cfg, init_seed=0):
        from megatron_lax.method import init_weights, make_linear
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(nn.ModuleDict({"mix": make_linear(cfg, "mix", cfg.dim, cfg.dim, i)})
                                    for i in range(cfg.n_layers))
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if init_seed is not None and not self.embed.weight.is_meta:
            init_weights(self, init_seed)

    def weight_init_rules(self):
        from megatron_lax.method import module_init_rules
        rules = {}
        for prefix, module in self.named_modules():
            at = f"{prefix}." if prefix else ""
            if isinstance(module, (nn.Linear, nn.Embedding)):  # the head, and dense projections
                rules[f"{at}weight"] = ("normal", 0.02)
            elif isinstance(module, nn.LayerNorm):
                rules.update({f"{at}weight": ("ones", 0.0), f"{at}bias": ("zeros", 0.0)})
            else:
                rules.update(module_init_rules(module, at, self.cfg.resolved_lowrank_init, 0.02))
        return rules

    def forward(self, tokens):
        x, latent = self.embed(tokens), None
        for block in self.layers:
            y, latent = block["mix"](x, latent)
            x = self.cfg.toy_residual * x + torch.relu(y)
        return self.head(x)


class ToyLanguageModeling(LanguageModeling):
    """A task of the toy family's own: language modelling that reports and ranks by the validation loss."""
    headline_metric = ("val_loss", "toy val loss", False)
    metric_titles = {"val_loss": ("toy val loss", False)}

    @classmethod
    def describe_evaluation(cls, result):
        return f"toy: val loss {result['val_loss']:.4f} on {result['tokens']} tokens"

    def summarize(self, final, best_val_loss):
        fields, _ = super().summarize(final, best_val_loss)
        return fields, f"toy: val loss {final['val_loss']:.4f}"


class Mixer(Family):
    name, fields, projections, task = "mixer", MixerFields, ("mix",), "toy_language_modeling"
    data_fields = ("vocab_size",)

    def build(self, cfg, init_seed=0):
        return MixerLM(cfg, init_seed)

    def loss(self, outputs, targets):
        flat = targets.flatten()
        return nn.functional.cross_entropy(outputs.flatten(0, 1).float(), flat, ignore_index=-100,
                                           reduction="sum"), (flat != -100).sum()

    def projection_shapes(self, m):
        return {"mix": (m.dim, m.dim)}

    def count_parameters(self, cfg):
        from megatron_lax.method import projection_counts
        return 2 * cfg.vocab_size * cfg.dim + sum(projection_counts(cfg, "mix", cfg.dim, cfg.dim, i)[0]
                                                  for i in range(cfg.n_layers))

    def flops(self, cfg, seq_len=0):
        from megatron_lax.method import projection_counts
        forward = 2 * cfg.dim * cfg.vocab_size + sum(projection_counts(cfg, "mix", cfg.dim, cfg.dim, i)[1]
                                                     for i in range(cfg.n_layers))
        return {"forward": forward, "train": 3 * forward}


@pytest.fixture
def toy_family(monkeypatch):
    from megatron_lax import models, tasks
    monkeypatch.setattr(ModelConfig, "__dataclass_fields__", dict(ModelConfig.__dataclass_fields__))  # undone after
    monkeypatch.setitem(models.FAMILIES, "mixer", models.FAMILIES.get("mixer"))
    models.register(Mixer())  # the one line a new family needs
    monkeypatch.setitem(tasks.TASKS, "toy_language_modeling", ToyLanguageModeling)  # and the one of its task
    return "mixer"


def test_a_family_defined_in_a_test_trains_resumes_evaluates_exports_and_is_reported(toy_family, toy_format,
                                                                                     tiny_overrides, tmp_path, capsys):
    from megatron_lax import export, info, train
    from megatron_lax.evaluate import main as evaluate
    from megatron_lax.experiments import compare, sweep
    from megatron_lax.loading.ours import load_pretrained
    from megatron_lax.models import build_model, count_parameters

    extra = dict(model__arch=toy_family, model__method=toy_format, model__lax_gate="identity", model__toy_blocks=2,
                 model__toy_residual=0.5, train__steps=4, checkpoint__every=2, logging__log_every=1,
                 logging__lax_stats_every=2)
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    assert train.main(_cli(tiny_overrides(straight, **extra))) == 0
    assert train.main(_cli(tiny_overrides(paused, **extra, train__stop_after=2))) == 0
    assert train.main(_cli(tiny_overrides(paused, **extra, checkpoint__resume="auto"))) == 0
    assert losses(paused) == losses(straight) and len(losses(straight)) == 4

    cfg = load_config(str(straight / "config.yaml"))
    assert cfg.model.toy_residual == 0.5
    model = build_model(cfg.model)
    assert isinstance(model, MixerLM) and count_parameters(cfg.model) == sum(p.numel() for p in model.parameters())
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert any("lax_rms/mix/1/crossing" in r for r in records)  # introspection found the toy's projections

    finished = json.loads((straight / "finished.json").read_text())
    assert finished["tokens"] == [r for r in records if "loss" in r][-1]["tokens"] > 0  # the task's unit
    capsys.readouterr()
    assert evaluate(["--checkpoint", str(straight), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["val_ppl"] > 1
    assert evaluate(["--checkpoint", str(straight)]) == 0  # the line is the task's
    assert capsys.readouterr().out.startswith(f"toy: val loss {evaluated['val_loss']:.4f} on {evaluated['tokens']} tokens  [")
    assert export.main(["--checkpoint", str(straight), "--output", str(tmp_path / "export")]) == 0
    assert isinstance(load_pretrained(tmp_path / "export"), MixerLM)
    capsys.readouterr()
    assert info.main(["--config", str(straight / "config.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == count_parameters(cfg.model)
    assert compare.main([str(straight), str(paused), "--output", str(tmp_path / "c.png")]) == 0
    assert "| toy val loss |" in capsys.readouterr().out  # compare ranks by the task's headline metric

    overrides = tiny_overrides(tmp_path / "unused", **{**extra, "checkpoint__every": 0}, train__select_tokens=2048)
    assert sweep.main([*_cli(overrides), "--lrs", "1e-3,4e-3", "--rungs", "2", "--plateau=-inf",
                       "--out", str(tmp_path / "sweep")]) == 0
