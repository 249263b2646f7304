"""Checkpoint save and verify time, with each rank checksumming its share of the files.

    python benchmarks/bench_checkpoint.py [--nproc 1 2] [--preset llama_350m] [--engine fsdp]
        [--repeats 3] [--out DIR] [-- --section.key value ...]

For each process count, one torchrun: every rank builds the real Trainer (SVD, vocabulary 32,000,
fp32), takes one optimizer step on a 1 x 32-token micro-batch so that the AdamW moments exist, then
times, `--repeats` times (median reported):
- save: `checkpoint.save` as the trainer calls it (engine files, rank files, per-rank checksums,
  agreement, manifest, rename), from a barrier to the last rank's return;
- verify, shared: `checkpoint.verify(dir, dist)`, each rank checksumming its share (what resume does);
- verify, one rank: `checkpoint.verify(dir)` on rank 0 alone, the whole checkpoint in one pass (what
  resume did before the shares).
Files are re-read from the page cache right after they are written, so checksumming is CPU-bound
here; on a shared filesystem reading adds to it, and splitting the reads helps as much.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_engines import free_port  # noqa: E402
from benchmarks.common import REPO, markdown_table, print_header  # noqa: E402
from megatron_lax.train import make_trainer  # noqa: E402


def timed(action) -> float:
    from megatron_lax.parallel.distributed import barrier
    barrier()
    start = time.perf_counter()
    action()
    barrier()
    return time.perf_counter() - start


def worker(out_dir: Path, repeats: int, config_args: list[str]) -> None:
    """One rank: a Trainer, one step, then the timed saves and verifies; rank 0 writes the medians."""
    from megatron_lax.training import checkpoint
    from megatron_lax.config import add_config_arguments, config_from_args
    from megatron_lax.parallel.distributed import shutdown
    from megatron_lax.training.trainer import Trainer

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    trainer = make_trainer(config_from_args(parser.parse_args(config_args)))
    trainer.engine.train(True)
    trainer.train_step()
    dist = trainer.dist
    times = {"save": [], "verify_shared": [], "verify_one_rank": []}
    for _ in range(repeats):
        times["save"].append(timed(trainer.save_checkpoint))
        final = trainer.run_dir / "checkpoints" / checkpoint.step_dir_name(trainer.step)
        times["verify_shared"].append(timed(lambda: checkpoint.verify(final, dist)))
        times["verify_one_rank"].append(timed(lambda: checkpoint.verify(final) if dist.is_main else None))
    if dist.is_main:
        files = json.loads((final / checkpoint.MANIFEST).read_text())["files"]
        result = {"ranks": dist.world_size, "params": trainer.task.n_params, "files": len(files),
                  "bytes": sum(meta["bytes"] for meta in files.values()),
                  **{name: statistics.median(values) for name, values in times.items()}}
        (out_dir / "result.json").write_text(json.dumps(result))
    shutdown()


def run(nproc: int, args, out_dir: Path) -> dict:
    overrides = {"model.method": "svd", "model.vocab_size": 32000, "train.precision": "fp32", "train.device": "cpu",
                 "data.seq_len": 32, "train.micro_batch": 1, "train.global_batch": nproc, "train.steps": 1,
                 "train.eval_tokens": 32, "logging.tensorboard": "false", "logging.progress": "false",
                 "checkpoint.keep": 1, "logging.run_dir": out_dir / "run", "parallel.engine": args.engine}
    config_args = ["--config", args.preset, *[a for k, v in overrides.items() for a in (f"--{k}", str(v))],
                   *args.extra]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), __file__, "--worker", str(out_dir), "--repeats",
               str(args.repeats), "--", *config_args]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if result.returncode != 0:
        raise RuntimeError(f"{nproc} ranks failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads((out_dir / "result.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts to measure")
    parser.add_argument("--preset", default="llama_350m")
    parser.add_argument("--engine", default="fsdp", choices=["ddp", "fsdp", "deepspeed"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="where to write the checkpoints (default: a temporary directory)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("extra", nargs="*", help="config overrides for every run (after --)")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.repeats, args.extra)
        return
    print_header("Checkpoint save and verify (each rank checksums its share)")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        for nproc in args.nproc:
            out_dir = Path(tmp) / f"ranks_{nproc}"
            out_dir.mkdir()
            r = run(nproc, args, out_dir)
            rows.append([args.preset, args.engine, r["ranks"], f"{r['params'] / 1e6:.1f}M", r["files"],
                         f"{r['bytes'] / 1e9:.2f}", f"{r['save']:.2f}", f"{r['verify_shared']:.2f}",
                         f"{r['verify_one_rank']:.2f}"])
            print(f"{nproc} rank(s) done", file=sys.stderr, flush=True)
    print(markdown_table(["preset (SVD, fp32)", "engine", "ranks", "parameters", "files", "GB", "save (s)",
                          "verify, each rank its share (s)", "verify, one rank reads all (s)"], rows))


if __name__ == "__main__":
    main()
