"""Fault injection for the tests, from outside the library: `install()` wraps the few functions a fault
interrupts, so the training step, the checkpoint writer and data preparation hold no test hook and pay
nothing for one. A test in the same process calls `install(...)`; a test that starts a process runs

    python -m tests.fault_injection ARGS...   (from the repository root; instead of python -m megatron_lax.train)

with the faults named in the environment, read once at the start:
MEGATRON_LAX_TEST_NAN_STEPS=3,4 poisons the gradients of those steps (a NaN loss weight);
MEGATRON_LAX_TEST_KILL_AT_STEP=5 SIGKILLs the process after step 5;
MEGATRON_LAX_TEST_KILL_IN_CHECKPOINT=4 SIGKILLs it halfway through writing the step-4 checkpoint;
MEGATRON_LAX_TEST_SLOW_PREPARE=20 makes preparing data on the fly take 20 s longer;
MEGATRON_LAX_TEST_PG_TIMEOUT=5 gives the process group a 5 s timeout.
A torchrun script (tests/megatron_lax/parallel/train_runs.py) calls `install_from_env()` itself."""
from __future__ import annotations

import functools
import os
import runpy
import signal
import sys
import time
from datetime import timedelta

import torch.distributed

from megatron_lax.data import tokens
from megatron_lax.training import checkpoint
from megatron_lax.training.trainer import Trainer

# What is injected now; the wrappers read it, so a process that runs several trainings can change it.
NAN_STEPS: set[int] = set()
KILL_AT_STEPS: set[int] = set()
KILL_IN_CHECKPOINT: set[int] = set()
_originals: dict = {}  # what install() wrapped


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _run_step(original):
    @functools.wraps(original)
    def run_step(self):
        if self.step + 1 in NAN_STEPS:
            engine = self.engine
            forward_backward = engine.forward_backward
            engine.forward_backward = lambda x, y, weight, **kw: forward_backward(x, y, float("nan"), **kw)
            try:
                record = original(self)
            finally:
                engine.forward_backward = forward_backward
        else:
            record = original(self)
        if self.step in KILL_AT_STEPS:
            kill_self()
        return record
    return run_step


def _write_state(original):
    @functools.wraps(original)
    def write_state(staging, *args, **kwargs):
        original(staging, *args, **kwargs)
        if any(staging.name == checkpoint.step_dir_name(s) + ".incomplete" for s in KILL_IN_CHECKPOINT):
            kill_self()  # the files are written, not yet hashed or published
    return write_state


def _slow(original, seconds: float):
    @functools.wraps(original)
    def slow(*args, **kwargs):
        time.sleep(seconds)  # the stand-in for a long preparation
        return original(*args, **kwargs)
    return slow


def install(nan_steps=(), kill_at_steps=(), kill_in_checkpoint=(), slow_prepare: float = 0.0,
            pg_timeout: float | None = None) -> None:
    """Sets the faults to inject (none: no fault); wraps the functions they interrupt once."""
    NAN_STEPS.clear(), NAN_STEPS.update(nan_steps)
    KILL_AT_STEPS.clear(), KILL_AT_STEPS.update(kill_at_steps)
    KILL_IN_CHECKPOINT.clear(), KILL_IN_CHECKPOINT.update(kill_in_checkpoint)
    if not _originals:
        _originals.update(run_step=Trainer.run_step, write_state=checkpoint._write_state,
                          ensure_prepared=tokens.ensure_prepared,
                          init_process_group=torch.distributed.init_process_group)
        Trainer.run_step = _run_step(Trainer.run_step)  # train_step runs it too
        checkpoint._write_state = _write_state(checkpoint._write_state)
    tokens.ensure_prepared = _slow(_originals["ensure_prepared"], slow_prepare) if slow_prepare \
        else _originals["ensure_prepared"]
    torch.distributed.init_process_group = functools.partial(
        _originals["init_process_group"], timeout=timedelta(seconds=pg_timeout)) if pg_timeout \
        else _originals["init_process_group"]


def uninstall() -> None:
    """Puts back every function install() wrapped."""
    if _originals:
        Trainer.run_step, checkpoint._write_state = _originals["run_step"], _originals["write_state"]
        tokens.ensure_prepared = _originals["ensure_prepared"]
        torch.distributed.init_process_group = _originals["init_process_group"]
        _originals.clear()


def _steps(name: str) -> set[int]:
    return {int(s) for s in os.environ.get(name, "").split(",") if s.strip()}


def install_from_env(nan_steps=()) -> None:
    """The faults the MEGATRON_LAX_TEST_* variables name, plus `nan_steps`."""
    timeout = os.environ.get("MEGATRON_LAX_TEST_PG_TIMEOUT")
    install(_steps("MEGATRON_LAX_TEST_NAN_STEPS") | set(nan_steps), _steps("MEGATRON_LAX_TEST_KILL_AT_STEP"),
            _steps("MEGATRON_LAX_TEST_KILL_IN_CHECKPOINT"),
            float(os.environ.get("MEGATRON_LAX_TEST_SLOW_PREPARE", "0")), float(timeout) if timeout else None)


if __name__ == "__main__":
    install_from_env()
    sys.argv = ["megatron_lax.train", *sys.argv[1:]]
    runpy.run_module("megatron_lax.train", run_name="__main__", alter_sys=True)
