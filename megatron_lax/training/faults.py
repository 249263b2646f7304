"""Preemption: SIGTERM / SIGUSR1 (what SLURM and Kubernetes send before they kill a job) ask the loop
to finish its step, write a checkpoint and exit 0; every rank stops at the same step. (The tests
inject faults from outside, by wrapping the step and the checkpoint writer: tests/fault_injection.py.)"""
from __future__ import annotations

import signal

import torch

import torch.distributed as dist

from ..parallel.distributed import is_distributed

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Set by a preemption signal on any rank; `agreed()` is the all-ranks view: one tiny all-reduce
    on the host, in a gloo group of its own, so that asking every step never waits for the GPU."""

    def __init__(self, device: torch.device):
        self.device, self.signal = device, None
        self.group = dist.new_group(backend="gloo") if is_distributed() else None
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._handle)
            # Restart system calls the signal interrupts: it may land on any thread, and the
            # communication threads of gloo and the c10d store can abort on an EINTR.
            signal.siginterrupt(sig, False)

    def _handle(self, signum, frame):
        self.signal = signum

    def agreed(self) -> bool:
        if self.group is None:
            return self.signal is not None
        flag = torch.tensor([1 if self.signal is not None else 0], dtype=torch.int32)  # on the host
        dist.all_reduce(flag, op=dist.ReduceOp.SUM, group=self.group)
        return bool(flag[0] > 0)


def ignore_preemption_signals() -> None:
    """Once a run is over: a late copy of the signal must not kill the process as it exits (Python
    restores the default action, termination, for its handlers when it shuts down). A process that
    goes on restores its own handlers afterwards (restore_signals): an ignored signal stays ignored
    in every program the process starts later, which could then not be preempted."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def preemption_handlers() -> dict:
    return {sig: signal.getsignal(sig) for sig in PREEMPTION_SIGNALS}


def restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
