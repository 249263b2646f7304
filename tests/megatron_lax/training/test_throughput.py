"""Throughput counts what was trained on: with one document per sequence (data.mode paper) the
scored tokens, not the padding."""
from __future__ import annotations

import itertools
import json

import pytest

from megatron_lax.config import load_config
from megatron_lax.train import make_trainer
from megatron_lax.training import trainer as trainer_module


class OneSecondPerLook:
    """time.time() that advances one second each time it is asked (only Throughput asks in the loop)."""

    def __init__(self):
        self.clock = itertools.count()

    def time(self):
        return float(next(self.clock))


def test_paper_mode_tokens_per_second_count_scored_tokens_not_padding(tiny_overrides, tmp_path, monkeypatch):
    cfg = load_config("llama_tiny", tiny_overrides(tmp_path, data__mode="paper", data__seq_len=256, train__steps=4, logging__log_every=2,
                                                   logging__lax_stats_every=0, train__eval_every=0))
    trainer = make_trainer(cfg)
    monkeypatch.setattr(trainer_module, "time", OneSecondPerLook())
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "tokens_per_s" in r]
    assert [r["tokens_per_s"] for r in logged] == pytest.approx([logged[0]["tokens"],
                                                                 logged[1]["tokens"] - logged[0]["tokens"]])
    assert logged[0]["tokens_per_s"] < 2 * 8 * 256  # steps per window x sequences x positions, padding included
