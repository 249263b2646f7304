"""run_scripts/slurm_example.sbatch played on this machine: `srun` and `scontrol` are stand-ins on
PATH (srun starts the task once per node with SLURM_NODEID set and hands SIGUSR1 on to every
process of every task, torchrun included, as SLURM's process tracking does; scontrol answers `show
hostnames` and records `requeue`). The batch script, run_scripts/launch.sh, torchrun and the trainer
are the real ones."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, as_cli, free_port, losses

SRUN = """#!/usr/bin/env bash
while [[ $1 == -* ]]; do echo "$1" >> "${SRUN_LOG:-/dev/null}"; shift; done  # srun's own options, recorded
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node "$@" &
  pids+=($!)
done
descendants() { local child; for child in $(pgrep -P "$1"); do echo "$child"; descendants "$child"; done; }
# like SLURM's process tracking: every process of every task, torchrun and its workers included
trap 'for pid in "${pids[@]}"; do kill -USR1 "$pid" $(descendants "$pid") 2>/dev/null; done' USR1
status=0
for pid in "${pids[@]}"; do
  while true; do
    wait "$pid"; code=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  [ "$code" = 0 ] || status=$code
done
exit "$status"
"""
SCONTROL = """#!/usr/bin/env bash
case "$1" in
  show) echo 127.0.0.1 ;;
  requeue) echo "requeue $2" >> "$SCONTROL_LOG" ;;
esac
"""
# A stand-in for `python` under ENGINE=single: "trains" until SIGUSR1, or ends as FAKE_END says.
FAKE_TRAINER = f"""#!{sys.executable}
import os, pathlib, signal, sys, time
run_dir = pathlib.Path(os.environ["RUN_DIR"])
signal.signal(signal.SIGUSR1, lambda *_: sys.exit(int(os.environ["FAKE_STATUS_WHEN_SIGNALLED"])))
(run_dir / ("started." + os.environ["SLURM_NODEID"])).touch()
if os.environ["FAKE_END"] == "finish":
    (run_dir / "finished.json").write_text("{{}}")
    sys.exit(0)
if os.environ["FAKE_END"] == "crash":
    sys.exit(3)
while True:
    time.sleep(0.1)
"""


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def slurm(tmp_path):
    """submit(run_dir, nodes, *args, **env) -> the running batch script (a Popen)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "srun", SRUN)
    executable(bin_dir / "scontrol", SCONTROL)

    def submit(run_dir: Path, nodes: int, *args, **env) -> subprocess.Popen:
        run_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable,
               "OMP_NUM_THREADS": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[01-02]",
               "SLURM_NNODES": str(nodes), "MASTER_PORT": str(free_port()), "RUN_DIR": str(run_dir),
               "SCONTROL_LOG": str(tmp_path / "scontrol.log"), **env}
        return subprocess.Popen(["bash", "run_scripts/slurm_example.sbatch", *map(str, args)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    submit.requeues = lambda: (tmp_path / "scontrol.log").read_text().split("\n")[:-1] \
        if (tmp_path / "scontrol.log").exists() else []
    return submit


def finish(job: subprocess.Popen, timeout: float) -> str:
    """The job's output once it ends; a job still running after `timeout` (a hang) is killed with
    everything it started, and fails the test."""
    try:
        return job.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        for pid in descendants(job.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        job.kill()
        output = job.communicate()[0]
        raise AssertionError(f"still running after {timeout} s:\n{output[-5000:]}") from None


def descendants(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(c) for c in children] + [d for c in children for d in descendants(int(c))]


def wait_for(condition, timeout: float, job: subprocess.Popen) -> None:
    """Polls condition() while the job runs; stops the job (failing the test) if it never holds."""
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline or job.poll() is not None:
            finish(job, 0)
            raise AssertionError(f"the job ended with status {job.returncode} before the condition held")
        time.sleep(0.1)


@pytest.mark.parametrize("end,signalled_status,expected_status,requeued", [
    ("preempted", 0, 0, True),  # checkpointed and exited 0 without finishing: requeue
    ("preempted", 1, 1, False),  # failed after the signal: not requeued, the failure is the job's status
    ("finish", None, 0, False),  # the schedule completed (finished.json): nothing to do
    ("crash", None, 3, False),  # no signal, no finish: a crash is not retried
])
def test_batch_script_requeues_only_a_preempted_unfinished_run(slurm, tmp_path, end, signalled_status,
                                                               expected_status, requeued):
    fake = executable(tmp_path / "fake_python", FAKE_TRAINER)
    run_dir = tmp_path / "run"
    job = slurm(run_dir, 2, ENGINE="single", PYTHON=str(fake), FAKE_END=end,
                FAKE_STATUS_WHEN_SIGNALLED=str(signalled_status))
    if end == "preempted":
        wait_for(lambda: len(list(run_dir.glob("started.*"))) == 2, 30, job)  # both nodes' trainers
        job.send_signal(signal.SIGUSR1)
    output = finish(job, 60)
    assert job.returncode == expected_status, output
    assert slurm.requeues() == (["requeue 4242"] if requeued else [])
    if expected_status:
        assert output.strip().splitlines()[-1] == (f"error: training exited with status {expected_status} before "
                                                   f"finishing; not requeued")


STEPS = 12
REHEARSAL = {**TINY, "train.token_budget": "0", "train.steps": STEPS, "optim.warmup_steps": 2,
             "train.micro_batch": 1, "data.mode": "packed", "train.eval_tokens": 13 * 32, "train.eval_every": 4,
             "checkpoint.every": 4, "checkpoint.keep": 3, "logging.log_every": 1, "logging.lax_stats_every": 2,
             "train.precision": "fp32"}  # the recipe's bf16-pure rounds 8- and 4-rank reductions apart (~1e-4)


def test_two_node_job_preempted_by_sigusr1_resumes_on_one_node_to_the_same_losses(slurm, prepared_sample,
                                                                                    tmp_path):
    """The rehearsal: the LLaMA-1B recipe shrunk to TINY shapes, FSDP2, a job of 2 nodes x 4 ranks
    (two torchruns, c10d rendezvous on 127.0.0.1) validating on 13 sequences (uneven over 8 ranks),
    preempted by SIGUSR1 to the batch script, requeued, and resumed as 1 node x 4 ranks; the losses
    equal an uninterrupted 8-rank run's."""
    args = as_cli(REHEARSAL)
    env = {"ENGINE": "fsdp", "NPROC_PER_NODE": "4", "DATA": str(prepared_sample), "TOKENIZER": "tokenizer/sample"}
    reference = subprocess.Popen(["bash", "run_scripts/pretrain_1b.sh", *args], cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True,
                                 env={**os.environ, **env, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
                                      "NPROC_PER_NODE": "8", "MASTER_PORT": str(free_port()),
                                      "RUN_DIR": str(tmp_path / "reference")})
    output = finish(reference, 240)
    assert reference.returncode == 0, output[-5000:]
    expected = losses(tmp_path / "reference")

    run_dir = tmp_path / "run"
    job = slurm(run_dir, 2, *args, **env)
    wait_for(lambda: len(losses_so_far(run_dir)) >= 3, 240, job)
    job.send_signal(signal.SIGUSR1)
    output = finish(job, 240)
    assert job.returncode == 0, output[-5000:]
    assert "on 8 rank(s)" in output and slurm.requeues() == ["requeue 4242"]
    stopped = max(losses(run_dir))
    assert 3 <= stopped < STEPS and f"stopped after step {stopped}" in output
    assert not (run_dir / "finished.json").exists()
    assert all(tokens == 13 * 32 for tokens in validation_tokens(run_dir))

    job = slurm(run_dir, 1, *args, **env)
    output = finish(job, 240)
    assert job.returncode == 0, output[-5000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:08d}'}" in output and "on 4 rank(s)" in output
    assert slurm.requeues() == ["requeue 4242"] and (run_dir / "finished.json").exists()
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == pytest.approx(expected[s], rel=1e-5) for s in got), {s: (got[s], expected[s]) for s in got if got[s] != pytest.approx(expected[s], rel=1e-5)}


def losses_so_far(run_dir: Path) -> dict:
    try:
        return losses(run_dir)
    except (OSError, ValueError):  # not written yet, or a line half-written
        return {}


def validation_tokens(run_dir: Path) -> list[int]:
    import json
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["val_tokens"] for r in map(json.loads, lines) if "val_tokens" in r]


def test_srun_is_given_the_jobs_cpus_per_task(slurm, tmp_path):
    """From Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch: the loader workers of each
    node would share one core unless the script passes it on."""
    fake = executable(tmp_path / "fake_python", FAKE_TRAINER)
    job = slurm(tmp_path / "run", 1, ENGINE="single", PYTHON=str(fake), FAKE_END="finish",
                FAKE_STATUS_WHEN_SIGNALLED="0", SLURM_CPUS_PER_TASK="64", SRUN_LOG=str(tmp_path / "srun.log"))
    finish(job, 30)
    assert job.returncode == 0
    assert "--cpus-per-task=64" in (tmp_path / "srun.log").read_text().split()
