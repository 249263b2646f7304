"""data.validation_batches split over ranks: every rank gets as many batches as the others (a
sharded forward is a collective, so one batch fewer on one rank is a hang), the extra batches are
fully masked, and the validation NLL and token count do not depend on the number of ranks."""
from __future__ import annotations

import pytest
import torch

from megatron_lax.data import tokens as data
from megatron_lax.config import load_config
from megatron_lax.models.llama import LlamaLax, token_nll


def shares(prepared, world: int, mode: str = "packed", seq_len: int = 32, micro: int = 4, tokens: int = 800):
    return [data.validation_batches(prepared, seq_len, micro, tokens, mode, rank, world) for rank in range(world)]


def test_the_uneven_split_from_the_field_gets_the_same_batch_count_everywhere(prepared_sample):
    """39,043 sequences on 8 ranks with micro-batch 16: 4,881 or 4,880 sequences per rank, which
    were 306 or 305 batches (a deterministic hang at the first validation)."""
    per_rank = shares(prepared_sample, 8, seq_len=4, micro=16, tokens=39_043 * 4)
    assert [len(batches) for batches in per_rank] == [306] * 8
    real = [sum(int((y != data.IGNORE).any(dim=1).sum()) for _, y in batches) for batches in per_rank]
    assert real == [4881] * 3 + [4880] * 5


@pytest.mark.parametrize("world", [3, 8, 40])
def test_padding_batches_are_fully_masked_and_change_no_total(prepared_sample, world):
    pad_id = data.Split(prepared_sample, "validation").pad_id
    per_rank = shares(prepared_sample, world)  # 25 sequences: 9/8/8 on 3 ranks, none on ranks 25-39 of 40
    assert len({len(batches) for batches in per_rank}) == 1
    for batches in per_rank:
        for x, y in batches:
            assert x.shape == y.shape and x.shape[1] == 32
            if (y == data.IGNORE).all():
                assert (x == pad_id).all()
    rows = lambda batches: {tuple(y_row.tolist()) for _, y in batches for y_row in y if (y_row != data.IGNORE).any()}
    assert set().union(*map(rows, per_rank)) == rows(shares(prepared_sample, 1)[0])


@pytest.mark.parametrize("mode", ["packed", "paper"])
def test_validation_nll_and_token_count_do_not_depend_on_the_number_of_ranks(prepared_sample, mode):
    vocab = data.model_vocab_size(data.read_manifest(prepared_sample), 0)
    cfg = load_config("llama_tiny", {"model.dim": "64", "model.n_layers": "2", "model.n_heads": "2",
                                     "model.ffn_dim": "128", "model.vocab_size": str(vocab)})
    model = LlamaLax(cfg.model, init_seed=0).eval()

    @torch.no_grad()
    def totals(world: int) -> tuple[float, int]:
        pairs = [token_nll(model(x), y) for batches in shares(prepared_sample, world, mode) for x, y in batches]
        return sum(float(nll) for nll, _ in pairs), sum(int(count) for _, count in pairs)

    one_nll, one_count = totals(1)
    for world in (3, 8):
        nll, count = totals(world)
        assert count == one_count and nll == pytest.approx(one_nll, rel=1e-6)
