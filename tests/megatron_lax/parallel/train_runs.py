"""Several training runs in one process group, so that a test pays for one torchrun (and one
DeepSpeed start) per launch:  torchrun ... train_runs.py RUNS.json

RUNS.json is a list of {"overrides": {"section.key": value, ...}, "nan_steps": [step, ...],
"disk_full": {"step": S, "rank": R}, "preset": NAME, "copy": [SOURCE, TARGET]}; a run starts from its preset (llama_tiny if none). nan_steps poisons
the gradients of those steps; disk_full makes every torch.save of rank R fail with ENOSPC while it
writes the step-S checkpoint (inside the engine's own save too: DCP, DeepSpeed, model.pt); copy
has rank 0 copy a finished run's folder first (its config.yaml naming the new place). A run that
ends in a CheckpointError or a refusal (also one refused before it starts) writes the message to
RUN_DIR/error_rank_R.txt on every rank, and the next run starts in the same process group."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch  # noqa: E402

from tests import fault_injection  # noqa: E402
from megatron_lax.training.checkpoint import CheckpointError  # noqa: E402
from megatron_lax.config import load_config  # noqa: E402
from megatron_lax.parallel.distributed import barrier, end_process, shutdown  # noqa: E402
from megatron_lax.training.trainer import Trainer  # noqa: E402
from megatron_lax.train import make_trainer  # noqa: E402


def failing_saves(trainer: Trainer, step: int):
    """torch.save, failing with ENOSPC while the trainer writes its step-`step` checkpoint."""
    real_save = torch.save

    def save(*args, **kwargs):
        if trainer.step == step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(*args, **kwargs)

    return mock.patch.object(torch, "save", save)


def copy_run(source: str, target: str) -> None:
    import shutil
    if os.environ.get("RANK", "0") == "0":
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("run.lock"))
        config = Path(target, "config.yaml")
        config.write_text(config.read_text().replace(f"run_dir: {source}", f"run_dir: {target}"))
    barrier()


def run_one(run: dict) -> None:
    if "copy" in run:
        copy_run(*run["copy"])
    cfg = load_config(run.get("preset", "llama_tiny"), {k: str(v) for k, v in run["overrides"].items()})
    try:
        trainer = make_trainer(cfg)
        disk_full = run.get("disk_full")
        patch = failing_saves(trainer, disk_full["step"]) if disk_full and disk_full["rank"] == trainer.dist.rank \
            else contextlib.nullcontext()
        with patch:
            trainer.fit()
    except (CheckpointError, ValueError) as e:
        Path(cfg.logging.run_dir, f"error_rank_{os.environ.get('RANK', '0')}.txt").write_text(str(e))


def run_all(runs: list[dict]) -> None:
    for run in runs:
        fault_injection.install_from_env(nan_steps=run.get("nan_steps", ()))  # the launch's faults stay on
        run_one(run)


def as_json(runs: list[dict]) -> str:
    return json.dumps([{**run, "overrides": {k: str(v) for k, v in run["overrides"].items()},
                        **({"copy": [str(p) for p in run["copy"]]} if "copy" in run else {})} for run in runs])


def launch(runs: list[dict], tmp_path: Path, nproc: int, timeout: int = 600) -> str:
    """Runs `runs` under torchrun with nproc processes; returns the output. A launch that outlives
    `timeout` (a hang) is stopped, workers included, and fails the test."""
    from conftest import REPO, free_port
    spec = tmp_path / "runs.json"
    spec.write_text(as_json(runs))
    # The venv's bin first on PATH, as under the DeepSpeed launcher: DeepSpeed JIT-builds a CPU op with
    # whichever ninja comes first, and two ninja versions rebuild it for each other (~30 s each time).
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), __file__, str(spec)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_launch(process)
        raise AssertionError(f"{nproc}-process launch still running after {timeout} s (a hang?)") from None
    assert process.returncode == 0, f"{' '.join(command)} failed:\n{output[-8000:]}"
    return output


def stop_launch(process: subprocess.Popen) -> None:
    """torchrun starts each worker in a session of its own: kill them by parent, then torchrun."""
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    for pid in map(int, children):
        os.kill(pid, signal.SIGKILL)
    process.kill()
    process.communicate()


if __name__ == "__main__":
    fault_injection.install_from_env()
    try:
        run_all(json.loads(Path(sys.argv[1]).read_text()))
        barrier()  # as megatron_lax.train.train: no rank tears the group down while another still uses it
    finally:
        shutdown()
    end_process(0)
