"""Preemption: SIGTERM / SIGUSR1 (what SLURM and Kubernetes send before they kill a job) ask the loop
to finish its step, write a checkpoint and exit 0; every rank stops at the same step. (The tests
inject faults from outside, by wrapping the step and the checkpoint writer: tests/fault_injection.py.)"""
from __future__ import annotations

import signal

import torch

from ..parallel.distributed import all_reduce_sum

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Set by a preemption signal on any rank; `agreed()` is the all-ranks view (one tiny all-reduce)."""

    def __init__(self, device: torch.device):
        self.device, self.signal = device, None
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._handle)
            # Restart system calls the signal interrupts: it may land on any thread, and the
            # communication threads of gloo and the c10d store can abort on an EINTR.
            signal.siginterrupt(sig, False)

    def _handle(self, signum, frame):
        self.signal = signum

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=self.device)
        return bool(all_reduce_sum(flag).item() > 0)


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
