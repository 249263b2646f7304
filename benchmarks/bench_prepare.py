"""Preprocessing throughput against the tokenizer's own batch-encode limit.

    python benchmarks/bench_prepare.py [--copies 8]

The shipped train shard is copied --copies times into a temporary directory (one input file per
copy, so there is work for every worker); the limit is one process batch-encoding the same texts
in memory, with no reading, writing or inter-process overhead.
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
import time
from pathlib import Path

from data_prep.prepare import BATCH_DOCUMENTS, prepare
from tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARD = REPO / "data" / "sample" / "c4-train.00000-of-00001.json.gz"


def raw_encode_rate(tokenizer_spec: str, copies: int) -> float:
    tok = load_tokenizer(tokenizer_spec)
    texts = [json.loads(line)["text"] for line in gzip.open(SHARD, "rt")] * copies
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(texts), BATCH_DOCUMENTS):
        tokens += sum(len(ids) + 1 for ids in tok.encode_batch(texts[i:i + BATCH_DOCUMENTS]))
    return tokens / (time.perf_counter() - start)


def prepare_rate(inputs: list[Path], tokenizer_spec: str, workers: int, scratch: Path) -> float:
    output = scratch / f"out-{workers}"
    shutil.rmtree(output, ignore_errors=True)
    start = time.perf_counter()
    manifest = prepare(inputs, tokenizer_spec, output, workers=workers, progress=False)
    return manifest["splits"]["train"]["tokens"] / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--tokenizer", default=str(REPO / "tokenizer" / "sample"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        inputs = []
        for i in range(args.copies):
            inputs.append(scratch / f"c4-train.{i:05d}-of-{args.copies:05d}.json.gz")
            shutil.copy(SHARD, inputs[-1])
        limit = raw_encode_rate(args.tokenizer, args.copies)
        rows = [(w, prepare_rate(inputs, args.tokenizer, w, scratch)) for w in (1, 2)]
    print(f"raw batch-encode limit (1 process, in memory): {limit:,.0f} tokens/s")
    print("| workers | tokens/s | tokens/s per worker | per worker / limit |")
    print("|---|---|---|---|")
    for workers, rate in rows:
        print(f"| {workers} | {rate:,.0f} | {rate / workers:,.0f} | {rate / workers / limit:.0%} |")


if __name__ == "__main__":
    main()
