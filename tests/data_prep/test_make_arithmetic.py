"""The arithmetic task: deterministic, correct worked solutions, and test operands that never
appear as operands of a training problem."""
from __future__ import annotations

import re

import pytest

from conftest import REPO
from data_prep.make_arithmetic import make, operand_pools, problems

EQUATION = re.compile(r"(\d+) ([+x-]) (\d+) = (\d+)")


def operands(record: dict) -> set[int]:
    return {int(n) for n in re.findall(r"\d+", record["instruction"])}


def test_solutions_are_correct_and_end_in_the_answer():
    for record in problems(300, operand_pools(0)["train"], "check"):
        steps = EQUATION.findall(record["output"])
        assert 1 <= len(steps) <= 2
        for a, op, b, result in steps:
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op] == int(result)
        assert record["output"].endswith(f"The answer is {record['answer']}.") and steps[-1][3] == record["answer"]
        assert int(record["answer"]) >= 0 and record["input"] == ""


def test_test_operands_never_appear_in_training_problems():
    """(test_seen_operands.json, a diagnostic, uses the training operands in problems not in train.json)"""
    pools = operand_pools(0)
    assert not set(pools["train"]) & set(pools["test"])
    assert any(n <= 12 for n in pools["test"]) and any(n > 12 for n in pools["test"])
    train = set().union(*map(operands, problems(500, pools["train"], "a")))
    test = set().union(*map(operands, problems(200, pools["test"], "b")))
    assert train <= set(pools["train"]) and test <= set(pools["test"])


@pytest.mark.parametrize("name", ["train.json", "test.json", "test_seen_operands.json",
                                  "pretrain/arith-train.00000-of-00001.json.gz",
                                  "pretrain/arith-validation.00000-of-00001.json.gz"])
def test_the_shipped_task_is_what_the_generator_writes(tmp_path_factory, name):
    out = tmp_path_factory.getbasetemp() / "arithmetic"
    if not (out / "test.json").is_file():
        make(out, 1500, 240, 6000, 0)
    assert (out / name).read_bytes() == (REPO / "data" / "arithmetic" / name).read_bytes()


STUDY = dict(n_train=1200, n_test=200, n_documents=6000, seed=0, max_number=12, max_factor=6,
             kinds=("add", "take_away", "compare", "multiply"), split="pairs")


def pair(record: dict) -> tuple:
    a, op, b, _ = EQUATION.findall(record["output"])[0]
    return op, *sorted((int(a), int(b)))


def test_the_pairs_split_keeps_every_test_operand_pair_out_of_training(tmp_path):
    make(tmp_path, **STUDY)
    import json
    train, test = (json.loads((tmp_path / f"{side}.json").read_text()) for side in ("train", "test"))
    assert len(train) == 1200 and len(test) == 200
    assert not {pair(r) for r in train} & {pair(r) for r in test}
    numbers = {n for r in train + test for n in operands(r)}
    assert numbers <= set(range(2, 13)) and {pair(r)[0] for r in test} == {"+", "-", "x"}
    for name in ("train.json", "test.json", "pretrain/arith-train.00000-of-00001.json.gz"):
        assert (tmp_path / name).read_bytes() == (REPO / "data" / "arithmetic_study" / name).read_bytes()
    with pytest.raises(ValueError, match="one-step kinds"):
        make(tmp_path / "two", **{**STUDY, "kinds": ("add_three",)})


def wording(record: dict) -> tuple[str, int]:
    """(kind, wording index) of a one-step problem, by matching its question against every wording."""
    from data_prep.make_arithmetic import WORDINGS
    found = []
    for kind, texts in WORDINGS.items():
        for i, text in enumerate(texts):
            pattern = re.escape(text)
            for field in ("n", "m", "a", "b", "t", "plural", "single"):
                pattern = pattern.replace(re.escape("{" + field + "}"), r"[\w']+")
            if re.fullmatch(pattern, record["instruction"]):
                found.append((kind, i))
    assert len(found) == 1, record["instruction"]
    return found[0]


def test_the_template_split_holds_one_wording_of_each_kind_and_the_test_pairs_out_of_training(tmp_path):
    import json

    from data_prep.make_arithmetic import HELD_OUT_WORDING, SELECTION_WORDING
    make(tmp_path, **{**STUDY, "n_test": 300, "split": "templates"})
    files = {name: json.loads((tmp_path / f"{name}.json").read_text())
             for name in ("train", "test_templates", "test_pairs", "test_both", "select_templates")}
    held_out = {(kind, HELD_OUT_WORDING) for kind in STUDY["kinds"]}
    selection = {(kind, SELECTION_WORDING) for kind in STUDY["kinds"]}
    wordings = {name: {wording(r) for r in records} for name, records in files.items()}
    pairs = {name: {pair(r) for r in records} for name, records in files.items()}
    assert len(files["train"]) == 1200 and all(len(files[n]) == 300 for n in files if n != "train")
    assert len(wordings["train"]) == 12 and not wordings["train"] & (held_out | selection)  # 3 wordings of 4 kinds
    assert wordings["test_templates"] == wordings["test_both"] == held_out
    assert wordings["select_templates"] == selection  # a fourth split: no test or training wording
    assert wordings["test_pairs"] <= wordings["train"]
    assert pairs["test_templates"] <= pairs["train"] and pairs["select_templates"] <= pairs["train"]  # new wording only
    assert {r["instruction"] for r in files["select_templates"]}.isdisjoint(
        r["instruction"] for name in files if name != "select_templates" for r in files[name])
    assert not (pairs["test_pairs"] | pairs["test_both"]) & pairs["train"]  # the facts are new
    for records in files.values():
        for r in records:
            a, op, b, result = EQUATION.findall(r["output"])[0]
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op] == int(result)
            assert {int(a), int(b)} <= operands(r) and r["answer"] == result
    for name in ("train.json", "test_templates.json", "test_pairs.json", "test_both.json", "select_templates.json"):
        assert (tmp_path / name).read_bytes() == (REPO / "data" / "arithmetic_templates" / name).read_bytes()
