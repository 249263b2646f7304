"""Evaluation of fine-tuned models: batched greedy decoding equals one-at-a-time decoding, answers
are extracted as LLM-Adapters does, and results become a Table 7/8-style comparison."""
from __future__ import annotations

import json

import pytest
import torch

from megatron_lax import finetune_eval
from megatron_lax.config import ModelConfig
from megatron_lax.generate import generate
from megatron_lax.models.llama import LlamaLax


def test_batched_greedy_decoding_equals_decoding_each_prompt_alone():
    model = LlamaLax(ModelConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=48, vocab_size=40), init_seed=0).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 40, (n,), generator=g).tolist() for n in (3, 9, 5, 1)]
    eos = generate(model, prompts[1], 3, greedy=True)[2]  # so that some sequences stop early, others not
    batched = finetune_eval.greedy_batch(model, prompts, max_new_tokens=6, eos_id=eos, pad_id=0)
    alone = [[t for t in generate(model, p, 6, greedy=True, eos_id=eos) if t != eos] for p in prompts]
    assert batched == alone and len(batched[1]) == 2 and max(map(len, batched)) == 6


@pytest.mark.parametrize("response,answer,correct", [
    ("12 + 30 = 42. The answer is 42.", "42", True),
    ("The total is 1,234.", "1234", True),
    ("3 / 4 = 0.75, so 0.7501", "0.75", True),
    ("it is -3", "-3", True),
    ("42 then 43", "42", False),
    ("no number here", "5", False),
])
def test_arithmetic_answers_are_the_last_number_within_1e3(response, answer, correct):
    assert finetune_eval.grader([answer, "7"])(response, answer) is correct


def test_multiple_choice_answers_are_the_first_label_named():
    correct = finetune_eval.grader(["option1", "option2", "option2"])
    assert correct("the correct answer is option2", "option2")
    assert not correct("option1, or perhaps option2", "option2")
    assert not correct("options are hard", "option1")
    letters = finetune_eval.grader(["A", "C", "E"])
    assert letters("The answer is (C). Because ...", "C") and not letters("Answer: E", "C")


def result(method: str, accuracies: list[float], trainable: int = 5) -> dict:
    return {"method": method, "trainable": trainable, "parameters": 1000,
            "files": [{"file": f"data/{name}.json", "accuracy": a} for name, a in zip(("add", "mul"), accuracies)]}


def test_table_pools_seeds_per_method_with_mean_and_spread(tmp_path):
    paths = []
    for i, (method, accs) in enumerate([("LoRA", [0.5, 0.2]), ("LoRA", [0.7, 0.4]), ("LaX-LoRA (linear)", [0.6, 0.3])]):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(result(method, accs)))
    table = finetune_eval.table(finetune_eval.read_results([str(p) for p in paths])).splitlines()
    assert table[0] == "| method | runs | trainable parameters | add | mul | avg |"
    assert table[2] == "| LoRA | 2 | 5 (0.50%) | 60.0 ± 14.1 | 30.0 ± 14.1 | 45.0 ± 14.1 |"
    assert table[3] == "| LaX-LoRA (linear) | 1 | 5 (0.50%) | 60.0 | 30.0 | 45.0 |"
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not a finetune_eval result"):
        finetune_eval.read_results([str(tmp_path / "bad.json")])
