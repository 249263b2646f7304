"""Step time and peak memory per rank of each engine, on the same model and global batch.

    python benchmarks/bench_engines.py [--nproc 2] [--steps 10] [--preset llama_tiny]
        [--device auto|cpu|cuda] [--precision auto|fp32|bf16-mixed|bf16-pure] [--compile]
        [--flash-attn] [--activation-checkpointing] [--engines single ddp fsdp zero1 zero2 zero3]
        [-- --section.key value ...]

Each engine runs in its own launch (torchrun with --nproc processes; `single`: one process). Every
rank builds the real Trainer and times `train_step` (one optimizer step of the global batch); the
step time is rank 0's median over the steps after the first two (compilation and allocator warm-up).
Peak memory is each rank's own: peak RSS on CPU, torch.cuda.max_memory_allocated on GPU. The model is
SVD + LaX (identity) unless overridden after `--`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, markdown_table, print_header  # noqa: E402
from megatron_lax.train import make_trainer  # noqa: E402

ENGINES = {"single": {}, "ddp": {}, "fsdp": {}, "zero1": {"parallel.zero_stage": 1},
           "zero2": {"parallel.zero_stage": 2}, "zero3": {"parallel.zero_stage": 3}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_memory_gb(device) -> float:
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def worker(out_dir: Path, steps: int, config_args: list[str]) -> None:
    """One rank: trains `steps` steps with the real Trainer and writes its timings and memory."""
    import torch

    from megatron_lax.config import add_config_arguments, config_from_args
    from megatron_lax.parallel.distributed import shutdown
    from megatron_lax.training.trainer import Trainer

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    trainer = make_trainer(config_from_args(parser.parse_args(config_args)))
    device = trainer.dist.device
    trainer.engine.train(True)
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        record = trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(record["loss"])
    result = {"rank": trainer.dist.rank, "ranks": trainer.dist.world_size, "step_s": statistics.median(times[2:]),
              "peak_gb": peak_memory_gb(device), "loss": losses[-1], "precision": trainer.engine.precision,
              "device": str(device)}
    (out_dir / f"rank_{trainer.dist.rank}.json").write_text(json.dumps(result))
    shutdown()


def run_engine(name: str, args, out_dir: Path) -> list[dict]:
    engine = "deepspeed" if name.startswith("zero") else name
    overrides = {"model.method": "svd", "model.lax_gate": "identity", "train.global_batch": args.global_batch,
                 "train.micro_batch": args.micro_batch, "train.steps": args.steps, "train.eval_tokens": 4096,
                 "train.device": args.device, "train.precision": args.precision, "train.compile": args.compile,
                 "train.activation_checkpointing": args.activation_checkpointing,
                 "model.flash_attn": args.flash_attn, "logging.tensorboard": "false",
                 "logging.run_dir": out_dir / "run", "parallel.engine": engine, **ENGINES[name]}
    config_args = ["--config", args.preset, *[a for k, v in overrides.items() for a in (f"--{k}", str(v))],
                   *args.extra]
    launcher = [] if engine == "single" else [
        "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(free_port())]
    command = [sys.executable, *launcher, __file__, "--worker", str(out_dir), "--steps", str(args.steps),
               "--", *config_args]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS":
                                                                                   os.environ.get("OMP_NUM_THREADS", "1")})
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return sorted((json.loads(p.read_text()) for p in out_dir.glob("rank_*.json")), key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2, help="processes per distributed engine")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the first two are not counted)")
    parser.add_argument("--preset", default="llama_tiny")
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16-mixed", "bf16-pure"])
    parser.add_argument("--compile", action="store_true", help="torch.compile every block")
    parser.add_argument("--flash-attn", action="store_true", help="flash-attn where installed (CUDA, bf16)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("extra", nargs="*", help="config overrides for every run (after --)")
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be at least 3 (the first two are warm-up)")
    if args.worker:
        worker(args.worker, args.steps, args.extra)
        return
    print_header("Engines: step time and peak memory per rank")
    print(f"{args.preset}, global batch {args.global_batch} x micro {args.micro_batch}, {args.nproc} processes per "
          f"distributed engine, {args.steps} steps (median of the last {args.steps - 2}); device {args.device}, "
          f"precision {args.precision}, compile {args.compile}, flash-attn {args.flash_attn}, activation "
          f"checkpointing {args.activation_checkpointing}; extra overrides: {' '.join(args.extra) or 'none'}\n")
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.engines:
            out_dir = Path(tmp) / name
            out_dir.mkdir()
            rows = run_engine(name, args, out_dir)
            first = rows[0]
            table.append([name, first["ranks"], first["device"], first["precision"], f"{first['step_s']:.3f}",
                          " / ".join(f"{r['peak_gb']:.2f}" for r in rows), f"{first['loss']:.4f}"])
            print(f"{name} done", file=sys.stderr, flush=True)
    print(markdown_table(["engine", "ranks", "device", "precision", "step time (s)", "peak memory per rank (GB)",
                          "loss at the last step"], table))

if __name__ == "__main__":
    main()
