"""More than two ranks, for real (gloo, CPU): one torchrun of 3 processes, then one of 8.

- Validation sets that do not split evenly (3 ranks: 9/8/8 sequences; 8 ranks: 5 sequences, so
  ranks 5-7 hold none) on FSDP2 and ZeRO-3, with LaX latent statistics every step: the ranks stay
  in step, and the validation loss and token count equal one process's.
- A checkpoint write that fails on one rank, inside the engine's own save (DCP, DeepSpeed): every
  rank raises the same one-line error, the staging directory is gone, the previous checkpoint stays
  intact and `latest`, and the process group lives on (the next run of the launch trains).
- Resume onto another number of ranks (3 -> 8) for DDP, FSDP2 (DCP reshards) and ZeRO-3
  (DeepSpeed's universal checkpoint): the losses after resume equal the uninterrupted run's.
- Each rank checksums its share of a checkpoint when resuming: a file damaged in rank 3's share is
  caught, and the run resumes from the checkpoint before.

Every launch runs under a timeout, so a hang fails the test instead of blocking the suite.
Tolerance: 1e-5 relative, as for the engines' parity on 2 ranks (tests/.../test_engines.py).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import TINY, losses
from megatron_lax.training import checkpoint
from train_runs import launch, run_all

STEPS = 4
RUN = {**TINY, "model.method": "svd", "model.lax_gate": "identity", "optim.lr": 1e-2, "train.steps": STEPS,
       "train.global_batch": 24, "train.micro_batch": 1, "logging.log_every": 1, "logging.lax_stats_every": 1,
       "checkpoint.every": 2, "checkpoint.keep": 3, "train.eval_every": 2}
FSDP = {"parallel.engine": "fsdp"}
DDP = {"parallel.engine": "ddp"}
ZERO3 = {"parallel.engine": "deepspeed", "parallel.zero_stage": 3}
VALIDATION_SEQUENCES = {3: 25, 8: 5}  # packed, 32 tokens each
LAUNCH_TIMEOUT = 300


def run(prepared: Path, run_dir: Path, ranks: int, fail_on_rank: int | None = None, **settings) -> dict:
    """One run of the launch; with fail_on_rank, that rank cannot write the final checkpoint."""
    spec = {"overrides": {**RUN, "data.path": prepared, "logging.run_dir": run_dir,
                          "train.eval_tokens": 32 * VALIDATION_SEQUENCES[ranks], **settings}}
    if fail_on_rank is not None:
        spec["disk_full"] = {"step": STEPS, "rank": fail_on_rank}
    return spec


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / checkpoint.step_dir_name(step)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def validations(run_dir: Path) -> dict[int, tuple[float, int]]:
    return {r["step"]: (r["val_loss"], r["val_tokens"]) for r in records(run_dir) if "val_loss" in r}


@pytest.fixture(scope="module")
def one_process(prepared_sample, tmp_path_factory) -> Path:
    """The validation references: the same runs in one process."""
    out = tmp_path_factory.mktemp("one")
    run_all([run(prepared_sample, out / str(ranks), ranks, **{"checkpoint.every": 0})
             for ranks in VALIDATION_SEQUENCES])
    return out


@pytest.fixture(scope="module")
def three_ranks(prepared_sample, tmp_path_factory) -> Path:
    """FSDP2 and ZeRO-3 whose final checkpoint fails on one rank, then DDP, in one process group."""
    out = tmp_path_factory.mktemp("three")
    launch([run(prepared_sample, out / "fsdp", 3, fail_on_rank=1, **FSDP),
            run(prepared_sample, out / "zero3", 3, fail_on_rank=2, **ZERO3),
            run(prepared_sample, out / "ddp", 3, **DDP)], out, nproc=3, timeout=LAUNCH_TIMEOUT)
    return out


@pytest.fixture(scope="module")
def eight_ranks(prepared_sample, three_ranks, tmp_path_factory) -> Path:
    """ZeRO-3 failing on rank 5; each 3-rank run resumed from its step-2 checkpoint; and a copy of
    the DDP run whose newest checkpoint is damaged in a file that rank 3 checksums, resumed `auto`."""
    out = tmp_path_factory.mktemp("eight")
    resumed = [run(prepared_sample, out / f"{name}_from_3", 8, **engine,  # trust: DeepSpeed's files are pickles
                   **{"checkpoint.resume": step_dir(three_ranks / name, 2), "checkpoint.trust": "true"})
               for name, engine in (("fsdp", FSDP), ("ddp", DDP), ("zero3", ZERO3))]
    shutil.copytree(three_ranks / "ddp", out / "ddp_damaged")
    damage(step_dir(out / "ddp_damaged", STEPS), checked_by_rank=3, of_ranks=8)
    damaged = run(prepared_sample, out / "ddp_damaged", 8, **DDP, **{"checkpoint.resume": "auto"})
    output = launch([run(prepared_sample, out / "zero3", 8, fail_on_rank=5, **ZERO3), *resumed, damaged], out,
                    nproc=8, timeout=LAUNCH_TIMEOUT)
    (out / "output.txt").write_text(output)
    return out


def file_checked_by(directory: Path, rank: int, of_ranks: int) -> str:
    """The largest file of a checkpoint that `rank` of `of_ranks` checksums when verifying it."""
    files = json.loads((directory / "manifest.json").read_text())["files"]
    return checkpoint.shares({name: meta["bytes"] for name, meta in files.items()}, of_ranks)[rank][0]


def damage(directory: Path, checked_by_rank: int, of_ranks: int) -> None:
    path = directory / file_checked_by(directory, checked_by_rank, of_ranks)
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF
    path.write_bytes(bytes(content))


@pytest.mark.parametrize("ranks,name", [(3, "fsdp"), (3, "zero3"), (8, "zero3"), (8, "fsdp_from_3")])
def test_uneven_validation_matches_one_process(one_process, three_ranks, eight_ranks, ranks, name):
    run_dir = (three_ranks if ranks == 3 else eight_ranks) / name
    got, expected = validations(run_dir), validations(one_process / str(ranks))
    assert got and set(got) <= set(expected)
    for step, (loss, tokens) in got.items():
        assert tokens == expected[step][1] == 32 * VALIDATION_SEQUENCES[ranks]
        assert loss == pytest.approx(expected[step][0], rel=1e-5)
    latent_steps = [r["step"] for r in records(run_dir) if "lax_rms/q/1/crossing" in r]
    # at initialisation (unless the run resumed), then every step, including those of ranks with no sequence
    assert latent_steps == ([] if "_from_" in name else [0]) + sorted(losses(run_dir))


@pytest.mark.parametrize("ranks,name,failed_rank", [(3, "fsdp", 1), (3, "zero3", 2), (8, "zero3", 5)])
def test_failed_write_on_one_rank_raises_everywhere_and_keeps_the_last_checkpoint(three_ranks, eight_ranks, ranks,
                                                                                  name, failed_rank):
    run_dir = (three_ranks if ranks == 3 else eight_ranks) / name
    errors = {(run_dir / f"error_rank_{r}.txt").read_text() for r in range(ranks)}
    assert errors == {f"could not write checkpoint {step_dir(run_dir, STEPS)}: rank {failed_rank}: No space left "
                      f"on device; the previous checkpoint is unchanged"}
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    assert checkpoint.verify(step_dir(run_dir, 2)) is None


@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero3"])
def test_resume_onto_more_ranks_continues_the_same_run(three_ranks, eight_ranks, name):
    uninterrupted, resumed = losses(three_ranks / name), losses(eight_ranks / f"{name}_from_3")
    assert sorted(resumed) == [3, 4]
    assert all(resumed[s] == pytest.approx(uninterrupted[s], rel=1e-5) for s in resumed), (resumed, uninterrupted)
    assert checkpoint.verify(step_dir(three_ranks / name, 2)) is None  # still intact after resharding from it


def test_a_file_damaged_in_one_ranks_share_is_caught_and_the_previous_checkpoint_resumed(three_ranks, eight_ranks):
    run_dir = eight_ranks / "ddp_damaged"
    damaged = step_dir(run_dir, STEPS)
    name = file_checked_by(damaged, rank=3, of_ranks=8)
    assert f"skipping checkpoint {damaged}: checksum mismatch in {name}" in (eight_ranks / "output.txt").read_text()
    uninterrupted, resumed = losses(three_ranks / "ddp"), losses(run_dir)
    assert all(resumed[s] == pytest.approx(uninterrupted[s], rel=1e-5) for s in (3, 4))
