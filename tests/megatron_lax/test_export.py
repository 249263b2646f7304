"""Evaluation, export and generation from real checkpoints."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import TINY, run_command, torchrun
from megatron_lax import load_pretrained
from megatron_lax.config import load_config
from megatron_lax.evaluate import load_model
from megatron_lax.export import export
from megatron_lax.generate import generate
from megatron_lax.training.trainer import Trainer
from megatron_lax.train import make_trainer


def trained(prepared, run_dir, **extra):
    values = {**TINY, "train.steps": 3, "optim.lr": 1e-2, "data.path": str(prepared),
              "logging.run_dir": str(run_dir), **extra}
    make_trainer(load_config("llama_tiny", {k: str(v) for k, v in values.items()})).fit()
    return run_dir


@pytest.mark.parametrize("method", ["dense", "svd"])
def test_hugging_face_export_matches_our_logits(prepared_sample, tmp_path, method):
    transformers = pytest.importorskip("transformers")
    run_dir = trained(prepared_sample, tmp_path / "run", **{"model.method": method})
    assert export(run_dir, tmp_path / "hf") == "huggingface"
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours, _, _ = load_model(run_dir, torch.device("cpu"))
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)
    assert (tmp_path / "hf" / "tokenizer" / "tokenizer.model").is_file()


@pytest.mark.parametrize("method,gate", [("svd", "identity"), ("cola", "none"), ("cola", "tensor")])
def test_lax_and_cola_export_in_our_format(prepared_sample, tmp_path, method, gate):
    run_dir = trained(prepared_sample, tmp_path / "run", **{"model.method": method, "model.lax_gate": gate})
    assert export(run_dir, tmp_path / "out") == "megatron_lax"
    loaded = load_pretrained(tmp_path / "out")
    ours, _, _ = load_model(run_dir, torch.device("cpu"))
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), ours(tokens))
    with pytest.raises(ValueError, match="not a megatron_lax export"):
        load_pretrained(tmp_path)


def test_evaluation_is_the_same_on_one_and_two_processes(prepared_sample, tmp_path):
    run_dir = trained(prepared_sample, tmp_path / "run", **{"model.method": "svd", "model.lax_gate": "identity"})
    one = json.loads(run_command([sys.executable, "-m", "megatron_lax.evaluate", "--checkpoint", str(run_dir),
                                  "--json"]).stdout.strip().splitlines()[-1])
    two = json.loads(torchrun(["-m", "megatron_lax.evaluate", "--checkpoint", str(run_dir), "--json",
                               "--micro-batch", "3"]).stdout.strip().splitlines()[-1])
    assert one["tokens"] == two["tokens"] == 4096 and one["sequences"] == two["sequences"] == 128
    assert two["val_ppl"] == pytest.approx(one["val_ppl"], rel=1e-9)
    assert one["ppl_low"] < one["val_ppl"] < one["ppl_high"]
    final = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_ppl" in l][-1]
    assert one["val_ppl"] == pytest.approx(final["val_ppl"], rel=1e-6)  # what the trainer reported


def test_generation_greedy_and_top1_agree(prepared_sample, tmp_path):
    run_dir = trained(prepared_sample, tmp_path / "run", **{"model.method": "cola", "model.lax_gate": "identity"})
    model, _, _ = load_model(run_dir, torch.device("cpu"))
    greedy = generate(model, [5, 6, 7], 12, greedy=True)
    sampled = generate(model, [5, 6, 7], 12, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(3))
    assert len(greedy) == 12 and greedy == sampled
    out = run_command([sys.executable, "-m", "megatron_lax.generate", "--checkpoint", str(run_dir), "--prompt",
                       "The weather", "--max-new-tokens", "5", "--greedy"]).stdout
    assert out.startswith("The weather")
