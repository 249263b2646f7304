"""Instruction data in the LLM-Adapters layout (math_10k, commonsense_170k): a JSON array, or JSON
lines, of {"instruction", "input", "output", optional "answer"}.

An example is BOS when the base expects it, the prompt (the Alpaca template LLM-Adapters uses, with
the indentation its source leaves in the string taken out), then the response and EOS, cut to
`cutoff_len` tokens. Every token is scored (LLM-Adapters' train_on_inputs), or only the response and
EOS. Micro-batches are right-padded to their longest example, padding
unscored, and nothing is packed. Each epoch visits the examples in a seeded permutation; the
loader's state is (epoch, step, micro-batch), so a resumed run sees exactly the remaining batches.

Malformed records never stop a run: each is skipped and counted by reason. Test files are read with
their own rule (instruction and answer; their `output` is empty in LLM-Adapters' files).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cursor import GlobalBatchCursor, permutation_order
from .tokens import IGNORE

WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n"
              "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
WITHOUT_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
SKIP_REASONS = ("broken_json", "not_an_object", "missing_field", "not_a_string", "empty_output", "empty_answer",
                "prompt_too_long")


def prompt(record: dict) -> str:
    """The text before the response."""
    template = WITH_INPUT if record.get("input") else WITHOUT_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


# --- reading ------------------------------------------------------------------------------------------

def parse_json_records(text: str, skipped: Counter) -> list:
    """The values of a JSON array or of JSON lines. A damaged array keeps every element before the
    damage; a damaged line is skipped. Either counts as broken_json."""
    decoder = json.JSONDecoder()
    stripped = text.lstrip()
    if not stripped.startswith("["):
        values = []
        for line in text.splitlines():
            if line.strip():
                try:
                    values.append(json.loads(line))
                except json.JSONDecodeError:
                    skipped["broken_json"] += 1
        return values
    values, pos = [], 1
    while True:
        while pos < len(stripped) and stripped[pos] in " \t\r\n,":
            pos += 1
        if pos < len(stripped) and stripped[pos] == "]":
            return values
        try:
            value, pos = decoder.raw_decode(stripped, pos)
        except json.JSONDecodeError:
            skipped["broken_json"] += 1
            return values
        values.append(value)


def problem_with(value, test: bool = False) -> str | None:
    """Why a parsed value is not a usable record, or None. Training records need `instruction` and a
    non-empty `output`; test records need `instruction` and `answer` only (LLM-Adapters' test files
    leave `output` empty, e.g. gsm8k/test.json)."""
    if not isinstance(value, dict):
        return "not_an_object"
    needed = ("instruction", "answer") if test else ("instruction", "output")
    if any(k not in value for k in needed):
        return "missing_field"
    if any(not isinstance(value.get(k) or "", str) for k in ("instruction", "input", "output")):
        return "not_a_string"
    if "answer" in value and (isinstance(value["answer"], bool) or not isinstance(value["answer"], (str, int, float))):
        return "not_a_string"
    if test:
        return "empty_answer" if not str(value["answer"]).strip() else None
    if not value["output"].strip():
        return "empty_output"
    return None


def read_records(path, skipped: Counter | None = None, test: bool = False) -> tuple[list[dict], Counter]:
    """The usable records of one file (training records, or with test=True test records) and the
    skip counts by reason. A file that cannot be read at all raises ValueError with one line."""
    skipped = Counter() if skipped is None else skipped
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror if isinstance(e, OSError) else 'not UTF-8'})") from None
    records = []
    for value in parse_json_records(text, skipped):
        reason = problem_with(value, test)
        if reason:
            skipped[reason] += 1
        else:
            records.append(value)
    return records, skipped


def describe_skipped(path, skipped: Counter) -> str:
    counts = ", ".join(f"{reason} {skipped[reason]}" for reason in SKIP_REASONS if skipped[reason])
    return f"{path}: skipped {sum(skipped.values())} records ({counts})" if counts else ""


# --- tokenizing ---------------------------------------------------------------------------------------

@dataclass
class Example:
    ids: np.ndarray  # [BOS] + prompt + response + EOS, at most cutoff_len tokens
    n_prompt: int  # the first n_prompt tokens are not scored (1 when training on inputs)


def tokenize(records: list[dict], tokenizer, cutoff_len: int, skipped: Counter, train_on_inputs: bool = True,
             bos: bool = False) -> list[Example]:
    """Examples whose response keeps at least one token after the cut; the others are counted as
    prompt_too_long. bos: start with the tokenizer's BOS. train_on_inputs: every token after the
    first is scored (LLM-Adapters' default), else the response and EOS only."""
    prefix = [tokenizer.bos_id] if bos else []
    prompts = [prefix + p for p in tokenizer.encode_batch([prompt(r) for r in records])]
    responses = tokenizer.encode_batch([r["output"] for r in records])
    examples = []
    for p, r in zip(prompts, responses):
        ids = (p + r + [tokenizer.eos_id])[:cutoff_len]
        if len(ids) <= len(p):
            skipped["prompt_too_long"] += 1
            continue
        examples.append(Example(np.asarray(ids, dtype=np.int64), 1 if train_on_inputs else len(p)))
    return examples


def prompt_ids(records: list[dict], tokenizer, bos: bool = False) -> list[list[int]]:
    """The prompts as the model sees them at evaluation (the same tokens training saw before the response)."""
    prefix = [tokenizer.bos_id] if bos else []
    return [prefix + p for p in tokenizer.encode_batch([prompt(r) for r in records])]


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (inputs, targets); targets are the next tokens of the response, IGNORE elsewhere."""
    width = max(len(e.ids) for e in examples) - 1
    inputs = np.full((len(examples), width), pad_id, dtype=np.int64)
    targets = np.full((len(examples), width), IGNORE, dtype=np.int64)
    for row, e in enumerate(examples):
        n = len(e.ids) - 1
        inputs[row, :n] = e.ids[:-1]
        targets[row, e.n_prompt - 1: n] = e.ids[e.n_prompt:]
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def split_validation(examples: list, val_size: int, seed: int) -> tuple[list, list]:
    """(train, validation): val_size examples drawn by a seeded permutation, the rest in file order."""
    if val_size >= len(examples):
        raise ValueError(f"finetune.val_size {val_size} leaves no training examples out of {len(examples)}")
    held = set(np.random.default_rng([seed, 1 << 20]).permutation(len(examples))[:val_size].tolist())
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def batches(examples: list[Example], micro_batch: int, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [collate(examples[i: i + micro_batch], pad_id) for i in range(0, len(examples), micro_batch)]


# --- training order -------------------------------------------------------------------------------------

class InstructLoader:
    """An iterator of this rank's micro-batches over the training examples, in the global-batch order
    of data/cursor.py (a new permutation each epoch), resumable exactly."""

    ORDER = "numpy-permutation"

    def __init__(self, examples: list[Example], global_batch: int, micro_batch: int, pad_id: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        self.examples, self.pad_id = examples, pad_id
        self.cursor = GlobalBatchCursor(len(examples), global_batch, micro_batch, rank, world_size, seed,
                                        permutation_order(len(examples), seed), self.ORDER, unit="training example",
                                        data="instruction data")
        self.steps_per_epoch = self.cursor.steps_per_epoch

    @property
    def epoch(self) -> int:
        return self.cursor.epoch

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return collate([self.examples[i] for i in self.cursor.next_ids()], self.pad_id)

    def state_dict(self) -> dict:
        return self.cursor.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.cursor.load_state_dict(state)
