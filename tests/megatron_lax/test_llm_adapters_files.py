"""LLM-Adapters' real test files, in shape (llm_adapters_files.py): every usable record is kept
(their outputs are empty), every dropped one is counted and printed, and each dataset is graded by
its own rule and its own options."""
from __future__ import annotations

import json

import pytest

import llm_adapters_files
from megatron_lax import finetune_eval


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    return root, llm_adapters_files.write(root)


def test_every_dataset_s_test_file_is_read_and_dropped_records_are_counted_and_printed(files, capsys):
    root, usable = files
    assert len(usable) == 16
    for name, pairs in usable.items():
        records, skipped = finetune_eval.read_test_file(root / name / "test.json")
        assert records == [r for r, _ in pairs]  # outputs are empty: kept all the same
        if name == "gsm8k":
            assert skipped == {"missing_field": 1, "not_an_object": 1, "empty_answer": 1}
            assert "gsm8k/test.json: skipped 3 records (not_an_object 1, missing_field 1, empty_answer 1)" in \
                capsys.readouterr().err
        else:
            assert not skipped


def test_each_dataset_is_graded_by_its_own_rule(files):
    root, usable = files
    for name, pairs in usable.items():
        records = [r for r, _ in pairs]
        checks = finetune_eval.graders(root / name / "test.json", records)
        for check, (record, right) in zip(checks, pairs):
            assert check(right), (name, right)
            assert not check("I do not know"), name
            assert not check("the answer is 999999 or answer9 or option9 or Z"), name


def test_option_labels_come_from_the_options_not_from_the_gold_answers(files):
    root, usable = files
    # every gold answer of this social_i_qa file is answer3; answer1 is still an option the model may name
    record = usable["social_i_qa"][0][0]
    check, = finetune_eval.graders(root / "social_i_qa" / "test.json", [record])
    assert not check("the correct answer is answer1, not answer3")
    # a label that is no option of the dataset is not read as the answer
    assert check("answer7 ... the correct answer is answer3")
    letters, = finetune_eval.graders(root / "AQuA" / "test.json", [usable["AQuA"][0][0]])
    assert letters("(C)") and not letters("A nice question. (C)")  # the first letter named is A


def test_mathqa_letters_and_mawps_json_numbers_are_accepted(files):
    root, usable = files
    mathqa, = finetune_eval.graders(root / "mathqa" / "test.json", [usable["mathqa"][0][0]])
    assert mathqa("the answer is B") and not mathqa("the answer is C")
    mawps, = finetune_eval.graders(root / "mawps" / "test.json", [usable["mawps"][0][0]])
    assert mawps("5") and not mawps("5.01")


def test_answers_mixing_numbers_and_labels_are_refused(tmp_path):
    path = tmp_path / "mixed.json"
    records = [{"instruction": "q", "answer": "12"}, {"instruction": "q", "answer": "true"}]
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match="mix numbers and labels"):
        finetune_eval.graders(path, finetune_eval.read_test_file(path)[0])
    with pytest.raises(ValueError, match="numeric dataset"):
        finetune_eval.graders(tmp_path / "gsm8k" / "test.json", [{"instruction": "q", "answer": "B"}])
    with pytest.raises(ValueError, match="not one of the options"):
        finetune_eval.graders(tmp_path / "boolq" / "test.json", [{"instruction": "q", "answer": "yes"}])
