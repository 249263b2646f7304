"""The loader: rank partitioning, exact resume, paper-mode padding, validation set, budgets, vocabulary."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_lax.config import load_config
from megatron_lax.data import (IGNORE, DataExhausted, Sequences, Split, TrainLoader, model_vocab_size,
                               resolve_steps, validation_batches)


def rows(batch) -> list[tuple]:
    return [tuple(r.tolist()) for r in batch[0]]


def take(loader, n):
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("mode", ["packed", "paper"])
def test_two_ranks_together_see_exactly_what_one_rank_sees(prepared_sample, mode):
    one = TrainLoader(prepared_sample, 32, mode, global_batch=8, micro_batch=2, seed=3)
    two = [TrainLoader(prepared_sample, 32, mode, global_batch=8, micro_batch=2, rank=r, world_size=2, seed=3)
           for r in range(2)]
    for _ in range(3):  # three optimizer steps: 4 micro-batches on one rank, 2 on each of two
        single = [row for batch in take(one, 4) for row in rows(batch)]
        split = [[row for batch in take(loader, 2) for row in rows(batch)] for loader in two]
        assert single == split[0] + split[1]
        assert not set(split[0]) & set(split[1])


def test_resume_from_state_continues_the_same_stream(prepared_sample):
    reference = TrainLoader(prepared_sample, 32, "packed", 8, 4, seed=1)
    expected = [rows(b) for b in take(reference, 12)]
    first = TrainLoader(prepared_sample, 32, "packed", 8, 4, seed=1)
    seen = [rows(b) for b in take(first, 5)]  # stop mid-step
    resumed = TrainLoader(prepared_sample, 32, "packed", 8, 4, seed=1)
    resumed.load_state_dict(first.state_dict())
    seen += [rows(b) for b in take(resumed, 7)]
    assert seen == expected


def test_resume_onto_another_number_of_ranks_at_a_step_boundary(prepared_sample):
    one = TrainLoader(prepared_sample, 32, "packed", 8, 2, seed=2)
    expected = [row for batch in take(one, 16) for row in rows(batch)][16:]  # steps 2 and 3
    two = [TrainLoader(prepared_sample, 32, "packed", 8, 2, rank=r, world_size=2, seed=2) for r in range(2)]
    for loader in two:
        take(loader, 4)  # two steps
    resumed = TrainLoader(prepared_sample, 32, "packed", 8, 2, seed=2)
    resumed.load_state_dict(two[0].state_dict())
    assert [row for batch in take(resumed, 8) for row in rows(batch)] == expected
    next(two[0])  # now mid-step: a micro-batch index that only means something on 2 ranks
    with pytest.raises(ValueError, match="only at a step boundary"):
        resumed.load_state_dict(two[0].state_dict())
    with pytest.raises(ValueError, match="global batch 8, not 16"):
        TrainLoader(prepared_sample, 32, "packed", 16, 2, seed=2).load_state_dict(one.state_dict())
    with pytest.raises(ValueError, match="not a multiple of micro batch 3 x 2 ranks"):
        TrainLoader(prepared_sample, 32, "packed", 8, 3, world_size=2)


def test_epochs_need_permission_and_reshuffle(prepared_sample):
    loader = TrainLoader(prepared_sample, 256, "paper", 512, 512, seed=0)
    assert loader.steps_per_epoch == 5  # 2893 documents
    first_epoch = take(loader, 5)
    with pytest.raises(DataExhausted):
        next(loader)
    repeating = TrainLoader(prepared_sample, 256, "paper", 512, 512, seed=0, allow_repetition=True)
    take(repeating, 5)
    assert rows(next(repeating)) != rows(first_epoch[0])


def test_packed_sequences_cover_the_stream_once(prepared_sample):
    split = Split(prepared_sample, "train")
    seqs = Sequences(split, 64, "packed")
    x0, y0 = seqs[0]
    x1, _ = seqs[1]
    assert (y0[:-1] == x0[1:]).all() and y0[-1] == x1[0]  # shifted by one, contiguous across sequences
    assert len(seqs) == (split.n_tokens - 1) // 64


def test_paper_mode_pads_and_masks(prepared_sample):
    split = Split(prepared_sample, "train")
    seqs = Sequences(split, 256, "paper")
    lengths = np.diff(split.doc_offsets)
    short = int(np.argmax((lengths > 10) & (lengths < 200)))
    i = int(np.searchsorted(seqs.documents, short))
    x, y = seqs[i]
    doc = split.tokens(int(split.doc_offsets[short]), int(split.doc_offsets[short + 1]))
    n = len(doc) - 1
    assert (x[:n] == doc[:-1]).all() and (y[:n] == doc[1:]).all() and y[n - 1] == split.eos_id
    assert (x[n:] == split.pad_id).all() and (y[n:] == IGNORE).all()
    long = int(np.argmax(lengths > 300))
    x, y = seqs[int(np.searchsorted(seqs.documents, long))]
    assert (y != IGNORE).all()  # truncated to seq_len + 1 tokens: nothing padded


@pytest.mark.parametrize("mode", ["packed", "paper"])
def test_validation_set_is_fixed_across_batch_sizes_and_ranks(prepared_sample, mode):
    def all_targets(micro, world):
        batches = [b for r in range(world) for b in validation_batches(prepared_sample, 64, micro, 5000, mode, r, world)]
        ys = torch.cat([y for _, y in batches])
        return sorted(tuple(row.tolist()) for row in ys), int((ys != IGNORE).sum())

    reference, scored = all_targets(4, 1)
    assert scored >= 5000 and all_targets(3, 2) == (reference, scored) and all_targets(8, 3) == (reference, scored)


def test_vocabulary_follows_the_tokenizer_or_must_hold_it():
    manifest = {"tokenizer": {"vocab_size": 32100}}
    assert model_vocab_size(manifest, 0) == 32128
    assert model_vocab_size(manifest, 32128) == 32128
    with pytest.raises(ValueError, match="the tokenizer has 32100 entries but model.vocab_size is 32000"):
        model_vocab_size(manifest, 32000)


def test_token_budgets():
    for preset, steps in (("llama_60m", 10_000), ("llama_130m", 20_000), ("llama_350m", 60_000), ("llama_1b", 100_000)):
        paper = load_config(preset, {"train.token_budget": "paper", "train.steps": "1"})
        assert resolve_steps(paper.train, paper.model, 256, 2e10, 58e6) == steps  # Table 14, exactly
    cfg = load_config("llama_60m", {"train.token_budget": "paper"})
    cfg.train.token_budget = "chinchilla"
    assert resolve_steps(cfg.train, cfg.model, 256, 2e9, 58e6) == 8851  # ceil(20 x 58M / (512 x 256))
    cfg.train.token_budget = "500M"
    with pytest.raises(ValueError, match=r"needs 500,039,680 tokens .* holds 1,000,000"):
        resolve_steps(cfg.train, cfg.model, 256, 1_000_000, 58e6)
    cfg.train.allow_repetition = True
    assert resolve_steps(cfg.train, cfg.model, 256, 1_000_000, 58e6) == 3815
    cfg.train.token_budget = "1.5e9"
    assert resolve_steps(cfg.train, cfg.model, 256, 2e9, 58e6) == 11445  # ceil(1.5e9 / 131072)
    cfg.train.token_budget, cfg.train.steps = "0", 7
    assert resolve_steps(cfg.train, cfg.model, 256, 2e9, 58e6) == 7
    tiny = load_config("llama_tiny", {"train.token_budget": "paper"})
    with pytest.raises(ValueError, match="not dim 256"):
        resolve_steps(tiny.train, tiny.model, 256, 2e9, 5e6)
    cfg.train.token_budget = "lots"
    with pytest.raises(ValueError, match="not paper, chinchilla or a number"):
        resolve_steps(cfg.train, cfg.model, 256, 1e9, 58e6)
