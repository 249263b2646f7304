"""Instruction data: the prompt template, malformed records skipped and counted, response-only
targets, and the seeded, exactly resumable, rank-independent order."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import REPO
from megatron_lax.data import instructions as instruct
from megatron_lax.data.tokenizer import load_tokenizer

GOOD = {"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5. The answer is 5.", "answer": "5"}


def test_prompt_is_the_llm_adapters_template_without_its_indentation():
    assert instruct.prompt(GOOD) == ("Below is an instruction that describes a task. Write a response that "
                                     "appropriately completes the request.\n\n### Instruction:\nAdd 2 and 3.\n\n"
                                     "### Response:\n")
    with_input = instruct.prompt({**GOOD, "input": "two, three"})
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input that provides "
                                 "further context.")
    assert with_input.endswith("### Instruction:\nAdd 2 and 3.\n\n### Input:\ntwo, three\n\n### Response:\n")


def test_malformed_records_are_skipped_and_counted_by_reason(tmp_path):
    records = [GOOD, [1, 2], {"instruction": "no output"}, {**GOOD, "input": 7}, {**GOOD, "output": "  "},
               {**GOOD, "answer": [5]}, {"instruction": "x", "output": "y"}]
    damaged = tmp_path / "damaged.json"
    damaged.write_text(json.dumps(records)[:-1] + ', {"instruction": "cut off')  # an array cut mid-record
    kept, skipped = instruct.read_records(damaged)
    assert kept == [GOOD, {"instruction": "x", "output": "y"}]
    assert skipped == Counter(not_an_object=1, missing_field=1, not_a_string=2, empty_output=1, broken_json=1)
    assert instruct.describe_skipped(damaged, skipped).endswith("skipped 6 records (broken_json 1, not_an_object 1, "
                                                                "missing_field 1, not_a_string 2, empty_output 1)")
    lines = tmp_path / "data.jsonl"
    lines.write_text(json.dumps(GOOD) + "\n{broken\n\n" + json.dumps("text") + "\n")
    kept, skipped = instruct.read_records(lines)
    assert kept == [GOOD] and skipped == Counter(broken_json=1, not_an_object=1)
    with pytest.raises(ValueError, match="cannot read it"):
        instruct.read_records(tmp_path / "missing.json")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(REPO / "tokenizer" / "sample"))


def test_only_the_response_and_eos_are_scored_and_the_cut_off_holds(tok):
    skipped = Counter()
    long = {**GOOD, "instruction": "many words " * 40}
    short, = instruct.tokenize([GOOD], tok, 256, skipped, train_on_inputs=False)
    prompt_ids, response_ids = tok.encode(instruct.prompt(GOOD)), tok.encode(GOOD["output"])
    assert short.ids.tolist() == prompt_ids + response_ids + [tok.eos_id] and short.n_prompt == len(prompt_ids)
    cut, = instruct.tokenize([GOOD], tok, len(prompt_ids) + 3, skipped, train_on_inputs=False)
    assert cut.ids.tolist() == prompt_ids + response_ids[:3]  # cut before the EOS, as LLM-Adapters does
    assert instruct.tokenize([long], tok, 64, skipped) == [] and skipped == Counter(prompt_too_long=1)

    inputs, targets = instruct.collate([short, cut], pad_id=0)
    assert inputs.shape == targets.shape == (2, len(short.ids) - 1)
    scored = targets[0][targets[0] != instruct.IGNORE].tolist()
    assert scored == response_ids + [tok.eos_id]
    assert inputs[0].tolist() == short.ids[:-1].tolist()
    assert targets[1][targets[1] != instruct.IGNORE].tolist() == response_ids[:3]
    assert (inputs[1, len(cut.ids) - 1:] == 0).all()  # right padding, not scored


def test_train_on_inputs_scores_the_prompt_too_and_bos_leads_when_asked(tok):
    prompt_ids, response_ids = tok.encode(instruct.prompt(GOOD)), tok.encode(GOOD["output"])
    plain, = instruct.tokenize([GOOD], tok, 256, Counter())  # LLM-Adapters' default: train_on_inputs
    assert plain.n_prompt == 1 and plain.ids.tolist() == prompt_ids + response_ids + [tok.eos_id]
    _, targets = instruct.collate([plain], pad_id=0)
    assert targets[0].tolist() == plain.ids[1:].tolist()  # every token after the first
    with_bos, = instruct.tokenize([GOOD], tok, 256, Counter(), train_on_inputs=False, bos=True)
    assert with_bos.ids.tolist() == [tok.bos_id] + prompt_ids + response_ids + [tok.eos_id]
    assert with_bos.n_prompt == 1 + len(prompt_ids)
    assert instruct.prompt_ids([GOOD], tok, bos=True) == [[tok.bos_id] + prompt_ids]


def examples(n: int) -> list[instruct.Example]:
    return [instruct.Example(np.arange(i, i + 3 + i % 4), 1) for i in range(n)]


def first_tokens(batch) -> list[int]:
    return batch[0][:, 0].tolist()


def test_loader_visits_each_example_once_per_epoch_in_a_seeded_order():
    loader = instruct.InstructLoader(examples(10), global_batch=4, micro_batch=2, pad_id=0, seed=7)
    epoch0 = [t for _ in range(4) for t in first_tokens(next(loader))]  # 2 steps x 2 micro-batches
    epoch1 = [t for _ in range(4) for t in first_tokens(next(loader))]
    assert len(set(epoch0)) == 8 and epoch0 != epoch1 and loader.epoch == 1
    again = instruct.InstructLoader(examples(10), 4, 2, 0, seed=7)
    assert [t for _ in range(4) for t in first_tokens(next(again))] == epoch0


def test_loader_resumes_exactly_and_ranks_share_the_single_process_order():
    single = instruct.InstructLoader(examples(12), 4, 1, 0, seed=1)
    reference = [first_tokens(next(single)) for _ in range(10)]
    first = instruct.InstructLoader(examples(12), 4, 1, 0, seed=1)
    for _ in range(5):
        next(first)
    resumed = instruct.InstructLoader(examples(12), 4, 1, 0, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert [first_tokens(next(resumed)) for _ in range(5)] == reference[5:]
    ranks = [instruct.InstructLoader(examples(12), 4, 1, 0, rank=r, world_size=2, seed=1) for r in range(2)]
    per_step = [[first_tokens(next(ranks[r])) for _ in range(2)] for r in range(2)]
    assert [t for r in range(2) for batch in per_step[r] for t in batch] == [t for b in reference[:4] for t in b]
    with pytest.raises(ValueError, match="belongs to other instruction data"):
        instruct.InstructLoader(examples(13), 4, 1, 0, seed=1).load_state_dict(first.state_dict())


def test_validation_split_is_seeded_and_disjoint():
    train, held = instruct.split_validation(list(range(20)), 5, seed=3)
    assert len(held) == 5 and sorted(train + held) == list(range(20))
    assert instruct.split_validation(list(range(20)), 5, seed=3) == (train, held)
    with pytest.raises(ValueError, match="leaves no training examples"):
        instruct.split_validation(list(range(5)), 5, seed=0)
    assert torch.is_tensor(instruct.batches(examples(3), 2, 0)[0][0])
