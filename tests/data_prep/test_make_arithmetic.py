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
