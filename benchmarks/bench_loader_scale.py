"""Loader start-up time and memory per rank on a C4-sized prepared set (targets: under 1 GB per rank
above the process's own baseline, start-up under 10 s).

    python benchmarks/bench_loader_scale.py [--dir /tmp/megatron_lax_loader_scale] [--tokens 2e9] [--documents 5e6]
    python benchmarks/bench_loader_scale.py --code DIR    # the loader of another checkout (e.g. before a change)

The data set is synthetic and written straight as prepared shards (no tokenizer): uint16 tokens,
log-normal document lengths (sigma 1, mean tokens / documents, at least one token + EOS), 1024 train
shards as in C4, per-shard files and manifest written by data_prep.prepare's own functions. It takes
~4 GB under --dir and is reused while its parameters match. Each rank is a process of its own, and
the `world` ranks of a row start together, as torchrun starts them. A rank reports its start-up
(TrainLoader + its first micro-batch; imports excluded), in wall-clock and in CPU time (ranks that
outnumber the cores wait for them), and its peak RSS meanwhile above its baseline
(RSS after importing torch and the loader, before building it); then, after 800 more micro-batches
(the first 600 map every shard), how much of its RSS above the baseline is anonymous memory and how
much is pages of the shard files mapped into it (page cache: shared by the ranks of a node, and
reclaimable), and the mean CPU time of the last 200 next() calls. A row shows the worst rank of each
column. Linux only (/proc/self).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP_BATCHES, STEADY_BATCHES = 600, 200


# --- the synthetic data set -------------------------------------------------------------------------

@dataclass
class SyntheticTokenizer:
    """What write_manifest records of a tokenizer; the name carries the set's parameters."""
    name: str
    kind: str = "synthetic"
    vocab_size: int = 32100  # t5-base
    bos_id: int = -1
    eos_id: int = 1
    pad_id: int = 0
    hash: str = "synthetic"

    def describe(self) -> dict:
        return asdict(self)


def write_split(directory: Path, split: str, tokens: int, documents: int, shards: int, tok, rng) -> list[dict]:
    from megatron_lax.data.prepare import write_shard
    import numpy as np

    (directory / split).mkdir(parents=True, exist_ok=True)
    mu = math.log(tokens / documents) - 0.5  # a log-normal's mean is exp(mu + sigma^2 / 2)
    metas = []
    for k in range(shards):
        lengths = np.maximum(2, rng.lognormal(mu, 1.0, documents // shards + (k < documents % shards)).round())
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = rng.integers(tok.eos_id + 1, tok.vocab_size, size=int(offsets[-1]), dtype=np.uint16)
        ids[offsets[1:] - 1] = tok.eos_id
        name = f"c4-{split}.{k:05d}-of-{shards:05d}"
        metas.append(write_shard(directory / split, name, ids, offsets, {"path": name, "bytes": 0, "mtime": 0},
                                 tok.hash))
    return metas


def ensure_synthetic(directory: Path, tokens: int, documents: int, shards: int, seed: int) -> dict:
    """The manifest of the synthetic set in `directory`, written unless it is there with these parameters."""
    import numpy as np
    from megatron_lax.data.prepare import write_manifest

    tok = SyntheticTokenizer(name=f"synthetic(tokens={tokens}, documents={documents}, shards={shards}, seed={seed})")
    manifest_path = directory / "manifest.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text())["tokenizer"]["name"] == tok.name:
        return json.loads(manifest_path.read_text())
    manifest_path.unlink(missing_ok=True)
    start, rng = time.perf_counter(), np.random.default_rng(seed)
    metas = write_split(directory, "train", tokens, documents, shards, tok, rng)
    metas += write_split(directory, "validation", tokens // 1000, documents // 1000, 1, tok, rng)
    manifest = write_manifest(directory, tok, metas)
    print(f"wrote {directory} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return manifest


# --- one rank ---------------------------------------------------------------------------------------

def memory_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def rank_main(spec: dict) -> None:
    """Runs in a process of its own: prints one JSON line of measurements."""
    sys.path.insert(0, spec["code"])
    import torch  # noqa: F401  (a training process has it loaded: part of the baseline)
    from megatron_lax.data import tokens as data

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
    baseline = {field: memory_mb(field) for field in ("VmRSS", "RssAnon", "RssFile")}
    wall, cpu = time.perf_counter(), time.process_time()
    loader = data.TrainLoader(spec["dir"], spec["seq_len"], spec["mode"], spec["global_batch"], spec["micro_batch"],
                              spec["rank"], spec["world"], seed=0, allow_repetition=True)
    next(loader)
    startup_wall, startup_cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = memory_mb("VmHWM") - baseline["VmRSS"]
    for _ in range(WARMUP_BATCHES):  # maps (and touches) every shard
        next(loader)
    cpu = time.process_time()
    for _ in range(STEADY_BATCHES):
        next(loader)
    next_cpu = (time.process_time() - cpu) / STEADY_BATCHES
    print(json.dumps({"startup_s": startup_wall, "startup_cpu_s": startup_cpu, "peak_above_mb": peak,
                      "baseline_mb": baseline["VmRSS"], "next_cpu_ms": next_cpu * 1e3,
                      "anon_mb": memory_mb("RssAnon") - baseline["RssAnon"],
                      "file_mb": memory_mb("RssFile") - baseline["RssFile"]}))


def run_ranks(args, mode: str, world: int) -> list[dict]:
    """Starts `world` rank processes together and collects their measurements."""
    procs = []
    for rank in range(world):
        spec = {"code": str(Path(args.code).resolve()), "dir": str(args.dir), "mode": mode, "rank": rank,
                "world": world, "seq_len": args.seq_len, "global_batch": args.global_batch,
                "micro_batch": args.micro_batch}
        procs.append(subprocess.Popen([sys.executable, __file__, "--rank-spec", json.dumps(spec)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    results = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"a rank failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


# --- the table ----------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/megatron_lax_loader_scale"))
    parser.add_argument("--tokens", type=float, default=2e9)
    parser.add_argument("--documents", type=float, default=5e6)
    parser.add_argument("--shards", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worlds", default="1,8", help="numbers of ranks to measure")
    parser.add_argument("--modes", default="packed,paper")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--code", default=str(REPO), help="the checkout whose megatron_lax is measured")
    parser.add_argument("--rank-spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_spec:
        return rank_main(json.loads(args.rank_spec))

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks.common import markdown_table, print_header

    manifest = ensure_synthetic(args.dir, int(args.tokens), int(args.documents), args.shards, args.seed)
    train = manifest["splits"]["train"]
    rows = []
    for mode in args.modes.split(","):
        for world in map(int, args.worlds.split(",")):
            ranks = run_ranks(args, mode, world)
            worst = {key: max(r[key] for r in ranks) for key in ranks[0]}
            rows.append([mode, world, f"{worst['startup_s']:.2f} s", f"{worst['startup_cpu_s']:.2f} s",
                         f"{worst['peak_above_mb']:.0f} MB", f"{worst['anon_mb']:.0f} MB", f"{worst['file_mb']:.0f} MB",
                         f"{worst['next_cpu_ms']:.2f} ms", f"{worst['baseline_mb']:.0f} MB"])
            print(f"  {mode} x {world} rank(s) done", file=sys.stderr)
    print_header("Loader start-up and memory per rank")
    print(f"Data: {train['tokens']:,} tokens, {train['documents']:,} documents in {len(train['shards'])} train "
          f"shards (synthetic, {args.dir}); global batch {args.global_batch} x {args.seq_len}, micro-batch "
          f"{args.micro_batch}; loader code: {Path(args.code).resolve()}\n")
    print(markdown_table(["mode", "ranks", "start-up", "its CPU time", "peak RSS above baseline, start-up",
                          f"after {WARMUP_BATCHES + STEADY_BATCHES} more micro-batches: anonymous",
                          "mapped file pages", f"CPU time per next(), last {STEADY_BATCHES}", "baseline RSS"], rows))


if __name__ == "__main__":
    main()
