"""Process-group set-up and the few collectives the trainer needs; all of them are no-ops in a
single process, so the same code runs with or without torch.distributed."""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no CUDA device is available")
    return torch.device(requested)


def init_distributed(engine: str, requested_device: str, backend: str = "auto") -> DistInfo:
    """Joins the process group started by torchrun / the DeepSpeed launcher (RANK, WORLD_SIZE,
    LOCAL_RANK in the environment); a plain `python` start is a world of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if engine != "single" and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    elif engine == "single" and world_size > 1:
        raise RuntimeError("parallel.engine single cannot run with WORLD_SIZE > 1: choose ddp, fsdp or deepspeed")
    return DistInfo(rank, world_size, local_rank, device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj) -> list:
    """Every rank's obj, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


LONG_WAIT = timedelta(days=7)


def run_on_main(action) -> None:
    """action() on rank 0 while the other ranks wait for it as long as it takes: in a gloo group of
    their own whose timeout is a week, not the process group's (10 minutes under NCCL), which
    preparing a real corpus far exceeds. Rank 0's failure is raised on every rank."""
    if not is_distributed():
        return action()
    group = dist.new_group(backend="gloo", timeout=LONG_WAIT)
    outcome: list = [None]
    failure = None
    if dist.get_rank() == 0:
        try:
            action()
        except Exception as e:  # noqa: BLE001 - handed to every rank, raised below
            failure = e
            outcome = [(type(e).__name__, str(e))]
    dist.broadcast_object_list(outcome, src=0, group=group)
    dist.destroy_process_group(group)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        kind, message = outcome[0]
        raise (FileNotFoundError if kind == "FileNotFoundError" else ValueError)(f"rank 0: {message}")


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def end_process(code: int) -> None:
    """Exits a launcher's worker process (torchrun, the DeepSpeed launcher) once its run is over.
    Such a worker skips the interpreter's teardown: on CPU gloo, one rank in a few aborted in C++
    static destruction after a clean finish ("terminate called without an active exception"),
    which made a finished multi-rank job exit non-zero. By the time this is called every file is
    closed and the process group is gone; only the standard streams need flushing."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)
