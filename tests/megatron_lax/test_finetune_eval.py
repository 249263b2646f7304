"""Evaluation of fine-tuned models: answers are extracted as LLM-Adapters does, and results become a
Table 7/8-style comparison. (Decoding: test_generation.py; LLM-Adapters' files: test_llm_adapters_files.py.)"""
from __future__ import annotations

import json

import pytest

from megatron_lax import finetune_eval


@pytest.mark.parametrize("response,answer,correct", [
    ("12 + 30 = 42. The answer is 42.", "42", True),
    ("The total is 1,234.", "1234", True),
    ("3 / 4 = 0.75, so 0.7501", "0.75", True),
    ("it is -3", "-3", True),
    ("42 then 43", "42", False),
    ("no number here", "5", False),
])
def test_arithmetic_answers_are_the_last_number_within_1e3(response, answer, correct):
    check, _ = finetune_eval.graders("data/gsm8k/test.json", [{"instruction": "q", "answer": answer},
                                                               {"instruction": "q", "answer": "7"}])
    assert check(response) is correct


def test_multiple_choice_answers_are_the_first_option_named():
    records = [{"instruction": "Pick one.\n\nAnswer format: option1/option2", "answer": a}
               for a in ("option1", "option2", "option2")]
    _, correct, _ = finetune_eval.graders("dataset/winogrande/test.json", records)
    assert correct("the correct answer is option2")
    assert not correct("option1, or perhaps option2")
    assert not correct("options are hard")
    letters = finetune_eval.graders("dataset/AQuA/test.json", [{"instruction": "q", "answer": "C"}])[0]
    assert letters("The answer is (C). Because ...") and not letters("Answer: E")


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
