"""Never lose a run: SIGKILL at any point and resume exactly, damaged checkpoints skipped, SIGTERM
saves and exits, non-finite steps skipped then stopped, shape changes refused, disk errors reported."""
from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, TINY, as_cli, losses
from megatron_lax.training import checkpoint
from megatron_lax.config import load_config
from megatron_lax.training.trainer import Trainer
from megatron_lax.train import make_trainer

STEPS = 8
RUN = {"model.method": "svd", "model.lax_gate": "identity", "optim.lr": 1e-2, "train.steps": STEPS,
       "logging.log_every": 1, "checkpoint.every": 2, "checkpoint.keep": 3}


def train_command(prepared, run_dir, faults: bool = False, **extra) -> list[str]:
    """The training command; with `faults`, through tests/fault_injection.py (the faults in the environment)."""
    values = {**TINY, **RUN, "data.path": prepared, "logging.run_dir": run_dir, **extra}
    entry = "tests.fault_injection" if faults else "megatron_lax.train"
    return [sys.executable, "-m", entry, "--config", "llama_tiny", *as_cli(values)]


def run(command, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def uninterrupted(prepared_sample, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    assert run(train_command(prepared_sample, run_dir)).returncode == 0
    return losses(run_dir)


@pytest.mark.parametrize("hook,step,resumes_from", [("MEGATRON_LAX_TEST_KILL_AT_STEP", 5, 4),
                                                    ("MEGATRON_LAX_TEST_KILL_AT_STEP", 4, 2),
                                                    ("MEGATRON_LAX_TEST_KILL_IN_CHECKPOINT", 6, 4)])
def test_sigkill_then_resume_is_bitwise_exact(prepared_sample, uninterrupted, tmp_path, hook, step, resumes_from):
    killed = run(train_command(prepared_sample, tmp_path, faults=True), env={hook: str(step)})
    assert killed.returncode == -signal.SIGKILL
    resumed = run(train_command(prepared_sample, tmp_path, **{"checkpoint.resume": "auto"}))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / 'checkpoints' / checkpoint.step_dir_name(resumes_from)}" in resumed.stdout
    after = losses(tmp_path)  # the last record of each step wins: the resumed run's
    assert {s: after[s] for s in range(resumes_from + 1, STEPS + 1)} == \
           {s: uninterrupted[s] for s in range(resumes_from + 1, STEPS + 1)}
    assert not list((tmp_path / "checkpoints").glob("*.incomplete"))  # the half-written one was replaced


@pytest.mark.parametrize("damage,reason", [("truncate", "truncated file"), ("delete", "missing file"),
                                           ("flip", "checksum mismatch in")])
def test_damaged_newest_checkpoint_is_skipped(prepared_sample, tmp_path, damage, reason):
    assert run(train_command(prepared_sample, tmp_path, **{"train.steps": 4})).returncode == 0
    newest = tmp_path / "checkpoints" / "step_00000004"
    target = newest / "model.pt"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "delete":
        target.unlink()
    else:
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    messages = []
    assert checkpoint.find_resumable(tmp_path / "checkpoints", messages.append) == tmp_path / "checkpoints" / "step_00000002"
    assert messages == [f"skipping checkpoint {newest}: {reason} model.pt"]


def test_sigterm_finishes_the_step_checkpoints_and_exits_zero(prepared_sample, tmp_path):
    command = train_command(prepared_sample, tmp_path, **{"train.steps": 10_000, "checkpoint.every": 0,
                                                          "train.allow_repetition": "true"})
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.2)
    sent = time.time()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-3000:]
    assert time.time() - sent < 30  # bound: one step plus one checkpoint write (well under a second here)
    stopped = max(losses(tmp_path))
    assert f"stopped after step {stopped}" in stdout
    assert (tmp_path / "checkpoints" / "latest").read_text() == checkpoint.step_dir_name(stopped)
    assert checkpoint.verify(tmp_path / "checkpoints" / checkpoint.step_dir_name(stopped)) is None


def tiny_trainer(prepared, run_dir, **extra) -> Trainer:
    values = {**TINY, **RUN, "data.path": str(prepared), "logging.run_dir": str(run_dir), **extra}
    return make_trainer(load_config("llama_tiny", {k: str(v) for k, v in values.items()}))


def test_non_finite_step_is_skipped_without_touching_weights_or_optimizer(prepared_sample, tmp_path, monkeypatch):
    import fault_injection
    trainer = tiny_trainer(prepared_sample, tmp_path)
    trainer.train_step(), trainer.train_step()
    params = {k: v.clone() for k, v in trainer.engine.base_model.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in trainer.engine.optimizer.state.values()]
    fault_injection.install(nan_steps={3})
    try:
        record = trainer.train_step()
    finally:
        fault_injection.uninstall()
    assert record["skipped"] == 1 and trainer.skipped_steps == 1
    assert all(torch.equal(params[k], v) for k, v in trainer.engine.base_model.state_dict().items())
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, trainer.engine.optimizer.state.values()))
    assert trainer.train_step()["skipped"] == 0 and trainer.nonfinite_in_a_row == 0


def test_too_many_non_finite_steps_stop_the_run_and_keep_the_last_checkpoint(prepared_sample, tmp_path):
    result = run(train_command(prepared_sample, tmp_path, faults=True, **{"train.max_nonfinite": 3}),
                 env={"MEGATRON_LAX_TEST_NAN_STEPS": "3,4,5"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: step 5: 3 non-finite steps in a row")
    # Steps 3 and 4 were skipped, so the step-4 checkpoint holds exactly the step-2 weights.
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000004" and checkpoint.verify(ckpts / "step_00000004") is None
    before, after = (torch.load(ckpts / f"step_0000000{s}" / "model.pt") for s in (2, 4))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_refuses_shape_changes_but_allows_schedule_changes(prepared_sample, tmp_path):
    assert run(train_command(prepared_sample, tmp_path, **{"train.steps": 2})).returncode == 0
    refused = run(train_command(prepared_sample, tmp_path, **{"checkpoint.resume": "auto", "model.dim": 96,
                                                             "model.n_heads": 2}))
    assert refused.returncode == 2
    assert "model.dim: 64 -> 96" in refused.stderr and "error: cannot resume" in refused.stderr
    allowed = run(train_command(prepared_sample, tmp_path, **{"checkpoint.resume": "auto", "train.steps": 4,
                                                             "optim.lr": 3e-3, "logging.log_every": 2}))
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "resumed from" in allowed.stdout and max(losses(tmp_path)) == 4


def test_disk_full_is_a_clear_error_and_the_previous_checkpoint_survives(prepared_sample, tmp_path, monkeypatch):
    trainer = tiny_trainer(prepared_sample, tmp_path)
    trainer.train_step()
    first = trainer.save_checkpoint()
    trainer.train_step()

    def no_space(directory):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer.engine, "save", no_space)
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device; the previous checkpoint is unchanged"):
        trainer.save_checkpoint()
    assert (tmp_path / "checkpoints" / "latest").read_text() == first.name
    assert checkpoint.verify(first) is None
    assert not list((tmp_path / "checkpoints").glob("*.incomplete"))


def test_preparing_data_outlasts_the_process_group_timeout_on_three_ranks(prepared_sample, tmp_path, monkeypatch):
    """Rank 0 tokenizes for 8 s longer than a 3 s process-group timeout allows while ranks 1-2 wait;
    the run trains. A second run into the same directory is then refused on every rank alike."""
    sys.path.insert(0, str(REPO / "tests" / "megatron_lax" / "parallel"))
    from train_runs import launch
    monkeypatch.setenv("MEGATRON_LAX_TEST_PG_TIMEOUT", "3")
    monkeypatch.setenv("MEGATRON_LAX_TEST_SLOW_PREPARE", "8")
    run = {**TINY, "model.method": "svd", "train.steps": 2, "train.global_batch": 12, "train.micro_batch": 4,
           "data.path": tmp_path / "prepared", "data.raw": REPO / "data" / "sample", "parallel.engine": "ddp",
           "data.tokenizer": REPO / "tokenizer" / "sample", "logging.run_dir": tmp_path / "run"}
    start = time.time()
    launch([{"overrides": run}, {"overrides": run}], tmp_path, nproc=3, timeout=300)
    assert time.time() - start > 8
    assert max(losses(tmp_path / "run")) == 2 and (tmp_path / "run" / "finished.json").is_file()
    errors = {(tmp_path / "run" / f"error_rank_{r}.txt").read_text() for r in range(3)}
    assert len(errors) == 1 and "holds an earlier run" in errors.pop()


def test_a_run_in_a_process_that_goes_on_leaves_its_signal_handlers_as_they_were(tiny_overrides, tmp_path):
    """train() ignores preemption signals while the run ends; a caller that goes on (a notebook, a sweep,
    these tests) gets its handlers back: an ignored signal would stay ignored in every program it starts
    later (bash cannot trap a signal ignored on entry), which could then never be preempted."""
    import signal

    from megatron_lax.train import main
    before = signal.getsignal(signal.SIGUSR1)
    assert main(["--config", "llama_tiny", *as_cli(tiny_overrides(tmp_path, train__steps=1))]) == 0
    assert signal.getsignal(signal.SIGUSR1) == before != signal.SIG_IGN


def test_a_full_disk_while_checkpointing_stops_every_one_of_three_ranks_with_one_line(prepared_sample, tmp_path):
    """D4: the real command on 3 gloo ranks under a file-size limit, so that torch.save fails halfway
    through model.pt as on a full disk: every rank exits with the same line (no hang), the partial
    checkpoint is removed and the last good one stays `latest`."""
    import resource

    from conftest import free_port
    batch = {"train.global_batch": 12, "train.micro_batch": 4, "train.steps": 2}
    assert run(train_command(prepared_sample, tmp_path, **batch)).returncode == 0
    limit = 64 * 1024  # larger than every file of the run but the weights and optimizer state

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()),
               *train_command(prepared_sample, tmp_path, **{**batch, "train.steps": 4, "parallel.engine": "ddp",
                                                            "checkpoint.resume": "auto"})[1:]]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=small_files,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    # one line per rank; three processes share the pipe, so a line may land inside another's: find, not split
    errors = re.findall(r"error: could not write checkpoint .*?the previous checkpoint is unchanged",
                        result.stdout + result.stderr)
    root = tmp_path / "checkpoints"
    assert result.returncode != 0 and len(errors) == 3 and len(set(errors)) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f"error: could not write checkpoint {root / 'step_00000004'}: rank 0: ")
    assert errors[0].endswith("a full disk or an I/O error); the previous checkpoint is unchanged")
    # the one traceback is torchrun's own report that its workers exited with status 2
    assert result.stderr.count("Traceback") == 1 and "ChildFailedError" in result.stderr
    assert (root / "latest").read_text() == "step_00000002" and checkpoint.verify(root / "step_00000002") is None
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
