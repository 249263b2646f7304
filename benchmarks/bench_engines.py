"""Step time and peak memory of each engine on the same model and global batch.

    python benchmarks/bench_engines.py [--nproc 2] [--steps 12] [--preset llama_tiny] [-- --section.key value ...]

Each engine trains --steps steps under torchrun (single: one process); the step time is the median
over the steps after the first two, and peak memory is rank 0's (peak RSS on CPU, peak allocated
on GPU; the engines' ranks are symmetric). Extra overrides after `--` go to every run, e.g.
`-- --train.precision bf16-mixed --train.compile true --train.micro_batch 32` on a GPU node.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINES = {"single": {}, "ddp": {}, "fsdp": {}, "zero1": {"parallel.zero_stage": 1},
           "zero2": {"parallel.zero_stage": 2}, "zero3": {"parallel.zero_stage": 3}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_engine(name: str, args, run_dir: Path) -> dict:
    engine = "deepspeed" if name.startswith("zero") else name
    overrides = {"model.method": "svd", "model.lax_gate": "identity", "train.steps": args.steps,
                 "train.global_batch": args.global_batch, "train.micro_batch": args.micro_batch,
                 "train.eval_tokens": 4096, "logging.log_every": 1, "logging.progress": "false",
                 "logging.tensorboard": "false", "logging.lax_stats_every": 0, "parallel.engine": engine,
                 "logging.run_dir": run_dir, **ENGINES[name]}
    cli = ["-m", "megatron_lax.train", "--config", args.preset,
           *[a for k, v in overrides.items() for a in (f"--{k}", str(v))], *args.extra]
    launcher = [] if engine == "single" else ["-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
                                              "--master_port", str(free_port())]
    result = subprocess.run([sys.executable, *launcher, *cli], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-2000:]}")
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    tokens_per_step = records[1]["tokens"] - records[0]["tokens"]
    step_times = [tokens_per_step / r["tokens_per_s"] for r in records[2:]]
    return {"step_s": statistics.median(step_times), "peak_gb": max(r["peak_memory_gb"] for r in records),
            "loss": records[-1]["loss"], "ranks": 1 if engine == "single" else args.nproc}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--preset", default="llama_tiny")
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES))
    parser.add_argument("extra", nargs="*", help="overrides for every run (after --)")
    args = parser.parse_args()
    print(f"{args.preset} SVD + LaX (identity), global batch {args.global_batch} x micro {args.micro_batch}, "
          f"{args.steps} steps; extra: {' '.join(args.extra) or 'none'}")
    print("| engine | ranks | step time (s) | rank-0 peak memory (GB) | loss at last step |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.engines:
            row = run_engine(name, args, Path(tmp) / name)
            print(f"| {name} | {row['ranks']} | {row['step_s']:.3f} | {row['peak_gb']:.2f} | {row['loss']:.4f} |",
                  flush=True)


if __name__ == "__main__":
    main()
