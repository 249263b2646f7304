"""Checkpoint rules that need no training: how the checksumming of a checkpoint is split over ranks
(every file exactly once, about equal bytes per rank, so no rank reads the whole checkpoint), and
which engines may resume which checkpoints."""
from __future__ import annotations

import random

import pytest

from megatron_lax.config import resume_fixed_fields
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


# --- what a resume may not change: every field the config declares fixed, one test each ------------------

def changed(value):
    """Another value of the same kind (check_compatible compares; it does not validate)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return value + ["x"]
    return 1 if value is None else f"{value}x"


def saved_run(tmp_path):
    from megatron_lax.config import dump_yaml, load_config
    cfg = load_config("llama_tiny", {"model.method": "cola", "model.rank": "16", "model.lax_gate": "dense"})
    (tmp_path / "config.yaml").write_text(dump_yaml(cfg))
    return cfg


FIXED = [(section, name) for section, names in resume_fixed_fields().items() for name in names]


@pytest.mark.parametrize("section,name", FIXED, ids=[f"{s}.{n}" for s, n in FIXED])
def test_a_resume_that_changes_a_fixed_field_is_refused(tmp_path, section, name):
    from megatron_lax.training import checkpoint
    cfg = saved_run(tmp_path)
    before = getattr(getattr(cfg, section), name)
    setattr(getattr(cfg, section), name, changed(before))
    with pytest.raises(checkpoint.CheckpointError, match=f"with a different model or data layout: {section}.{name}: "):
        checkpoint.check_compatible(tmp_path, cfg)


def test_the_fixed_fields_are_every_model_field_but_those_declared_free():
    import dataclasses

    from megatron_lax import config
    fixed = config.resume_fixed_fields()["model"]
    for must in ("n_kv_heads", "lax_latent", "only_latent_act", "lax_gate_init", "in_channels", "mlp_norm", "lax_gate"):
        assert must in fixed
    assert set(fixed) | set(config.RESUME_MAY_CHANGE["model"]) == {f.name for f in dataclasses.fields(config.ModelConfig)}


@pytest.mark.parametrize("section,name,value", [("model", "flash_attn", False), ("optim", "lr", 0.5),
                                                ("train", "steps", 99)])
def test_a_resume_may_change_what_leaves_the_model_and_data_alone(tmp_path, section, name, value):
    from megatron_lax.training import checkpoint
    cfg = saved_run(tmp_path)
    setattr(getattr(cfg, section), name, value)
    checkpoint.check_compatible(tmp_path, cfg)


# --- manifest paths stay inside their checkpoint ------------------------------------------------------------

@pytest.mark.parametrize("name", ["../outside.txt", "sub/../../outside.txt", "ABSOLUTE", "link.txt",
                                  "../ab/outside.txt"])
@pytest.mark.parametrize("exists", [True, False])
def test_a_manifest_naming_a_file_outside_the_checkpoint_is_refused_without_telling_if_it_exists(tmp_path, name,
                                                                                                 exists):
    import json

    from megatron_lax.training import checkpoint
    directory, sibling = tmp_path / "a", tmp_path / "ab"  # ab shares a's prefix
    directory.mkdir()
    sibling.mkdir()
    outside = (sibling if "ab/" in name else tmp_path) / "outside.txt"
    if exists:
        outside.write_text("secret")
    if name == "link.txt":
        (directory / "link.txt").symlink_to(outside)
    name = str(outside) if name == "ABSOLUTE" else name
    (directory / checkpoint.MANIFEST).write_text(json.dumps({"files": {name: {"bytes": 6, "sha256": "0" * 64}}}))
    assert checkpoint.verify(directory) == f"the manifest names a file outside the checkpoint ({name!r})"
