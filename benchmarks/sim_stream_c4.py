"""The full C4 plan of a streamed run, simulated without data or training: memory per rank, start-up
time and resume cost of data.streaming's real plan code on C4's shape.

    python benchmarks/sim_stream_c4.py [--read-mb-s 9] [--tokens-s 100000] [--workers 4]

C4's English train split: about 365M documents in 1,024 shards (near-equal), about 156B T5 tokens;
the 1B recipe's global batch of 512 x 256 on 64 ranks (8 lanes each). A synthetic index stands in for
the one a run builds (documents per shard within 0.5% of the mean; document lengths log-normal with
C4's mean of ~430 tokens), and the plan (streaming.SourcePlan) deals it to the lanes: what a rank
holds (the index's totals, a few shards' sizes, its lanes' ranges and shuffled orders) is measured on
rank 0's lanes with the real code. Start-up (building the index once; rank r counts shards r, r+W, ...
with its loader workers) and resume (a lane re-reads its range up to its place, without tokenising)
are computed from reading and tokenising rates measured by benchmarks/bench_stream.py on this machine
(the defaults: its compressed MB/s of one shard read for paper mode, its tokens/s for packed mode).
"""
from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common import markdown_table, print_header  # noqa: E402

from megatron_lax.data import streaming  # noqa: E402

SHARDS, DOCUMENTS, TOKENS = 1024, 365_000_000, 156_000_000_000
SHARD_MB = 305_000 / SHARDS  # compressed: C4 en train is ~305 GB of json.gz
LANES, RANKS, SEQ_LEN, BUFFER = 512, 64, 256, 1000


class SyntheticSplit:
    n_shards = SHARDS
    fingerprint = ["synthetic C4", SHARDS]


class SyntheticIndex:
    """streaming.Index's interface on C4's shape: per-shard totals, and a shard's document sizes
    drawn (seeded per shard) when a lane asks for them."""

    def __init__(self, packed: bool):
        rng = np.random.default_rng(0)
        self.split, self.packed, self.skipped = SyntheticSplit(), packed, Counter()
        self.documents = (DOCUMENTS / SHARDS * (1 + rng.uniform(-0.005, 0.005, SHARDS))).astype(np.int64)
        mean_tokens = TOKENS / DOCUMENTS
        self.tokens = (self.documents * mean_tokens * (1 + rng.normal(0, 0.001, SHARDS))).astype(np.int64)
        self._mean = mean_tokens

    def sizes(self, shard: int) -> np.ndarray:
        n = int(self.documents[shard])
        if not self.packed:
            return np.ones(n, dtype=np.int32)
        sizes = np.random.default_rng([1, shard]).lognormal(np.log(self._mean) - 0.5, 1.0, n)
        sizes = np.maximum(sizes * self.tokens[shard] / sizes.sum(), 1).astype(np.int32)
        sizes[-1] += self.tokens[shard] - sizes.sum()  # the shard's total, exactly
        return sizes


def simulate(mode: str, read_mb_s: float, tokens_s: float, workers: int) -> list:
    index = SyntheticIndex(packed=mode == "packed")
    plan = streaming.SourcePlan("c4", index, list(range(LANES)), 0, 0, mode, SEQ_LEN, BUFFER)
    per_rank = LANES // RANKS
    tracemalloc.start()
    start = time.perf_counter()
    held = []
    for k in range(per_rank):  # rank 0's lanes, as its workers lay them out at the start of a pass
        items = plan.lane_items(k, 0)
        order = plan.lane_order(k, 0, len(items))
        held.append((items, order, np.zeros(len(items), dtype=bool)))  # the reader's `needed` mask
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    lane_mb = sum(a.nbytes for h in held for a in h) / 1e6
    documents_per_lane = len(held[0][0])
    shards_per_rank = SHARDS / RANKS
    if mode == "packed":
        index_seconds = shards_per_rank * (TOKENS / SHARDS) / (tokens_s * workers)
    else:
        index_seconds = shards_per_rank * SHARD_MB / (read_mb_s * workers)
    lane_mb_read = documents_per_lane / (DOCUMENTS / SHARDS) * SHARD_MB  # compressed MB of a lane's range
    resume_worst = lane_mb_read * (per_rank / workers) / read_mb_s  # a worker's lanes, one after another
    return [mode, f"{plan.windows:,}", f"{documents_per_lane:,}", f"{lane_mb:,.0f} MB", f"{peak / 1e6:,.0f} MB",
            f"{seconds:.1f} s", f"{index_seconds / 60:,.0f} min", f"{resume_worst / 60:,.1f} min",
            f"{resume_worst / 120:,.1f} min"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--read-mb-s", type=float, default=9.0, help="compressed MB/s one process reads a "
                                                                    "shard at (bench_stream.py, paper index row)")
    parser.add_argument("--tokens-s", type=float, default=100_000, help="tokens/s one process counts "
                                                                         "(bench_stream.py, packed index row)")
    parser.add_argument("--workers", type=int, default=4, help="loader workers per rank (the recipes' 4)")
    parser.add_argument("--modes", default="paper,packed")
    args = parser.parse_args()
    print_header(f"The full C4 plan, simulated: {DOCUMENTS / 1e6:.0f}M documents in {SHARDS} shards, {LANES} lanes, "
                 f"{RANKS} ranks ({LANES // RANKS} lanes each), {args.workers} workers per rank")
    rows = [simulate(mode, args.read_mb_s, args.tokens_s, args.workers) for mode in args.modes.split(",")]
    print(markdown_table(["mode", "steps per pass", "documents per lane", "rank 0's lanes: ranges + orders",
                          "peak while planning them", "planning time (rank 0, a pass)",
                          "index, once (all ranks in parallel)", "resume, worst (end of a pass)",
                          "resume, mean"], rows))
    print(f"\nRates: {args.read_mb_s} compressed MB/s read per process, {args.tokens_s:,.0f} tokens/s counted per "
          f"process (from bench_stream.py); C4 shard {SHARD_MB:.0f} MB compressed.")


if __name__ == "__main__":
    main()
