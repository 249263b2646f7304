"""Checkpoint rules that need no training: how the checksumming of a checkpoint is split over ranks
(every file exactly once, about equal bytes per rank, so no rank reads the whole checkpoint), and
which engines may resume which checkpoints."""
from __future__ import annotations

import random

import pytest

from megatron_lax.training.checkpoint import shares


@pytest.mark.parametrize("world", [1, 2, 3, 8, 64])
def test_shares_cover_every_file_once_with_balanced_bytes(world):
    rng = random.Random(world)
    sizes = {f"file_{i}": rng.choice([10, 1000, 10**6, 3 * 10**8]) for i in range(rng.randint(1, 200))}
    lists = shares(sizes, world)
    assert len(lists) == world
    assert sorted(name for names in lists for name in names) == sorted(sizes)
    loads = [sum(sizes[name] for name in names) for names in lists]
    # largest-first greedy: no rank ends more than one file above the lightest
    assert max(loads) - min(loads) <= max(sizes.values())
    assert shares(dict(reversed(sizes.items())), world) == lists  # the same split on every rank


def test_a_dcp_checkpoint_spreads_its_shards_over_the_ranks():
    sizes = {f"dcp/__{r}_0.distcp": 500_000_000 for r in range(8)} | {"dcp/.metadata": 40_000} | \
            {f"rank_{r:05d}.pt": 5_000 for r in range(8)} | {"trainer_state.json": 300, "config.yaml": 2_000}
    loads = [sum(sizes[n] for n in names) for names in shares(sizes, 8)]
    assert max(loads) < 1.01 * 500_000_000 and min(loads) >= 500_000_000


@pytest.mark.parametrize("saved,resuming,refused", [("ddp", "single", False), ("single", "ddp", False),
                                                    ("fsdp", "ddp", True), ("deepspeed", "fsdp", True)])
def test_resume_is_refused_by_an_engine_that_cannot_read_the_checkpoint(tmp_path, saved, resuming, refused):
    from megatron_lax.training import checkpoint
    from megatron_lax.config import dump_yaml, load_config

    (tmp_path / "config.yaml").write_text(dump_yaml(load_config("llama_tiny", {"parallel.engine": saved})))
    cfg = load_config("llama_tiny", {"parallel.engine": resuming})
    if not refused:
        checkpoint.check_compatible(tmp_path, cfg)
        return
    with pytest.raises(checkpoint.CheckpointError, match=f"it holds parallel.engine {saved} state, which "
                                                         f"parallel.engine {resuming} cannot read"):
        checkpoint.check_compatible(tmp_path, cfg)
