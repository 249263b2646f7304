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
from tokenizer import load_tokenizer


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
