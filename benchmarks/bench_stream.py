"""Streamed training data (data.source stream): tokens/s per loader worker on local C4-layout shards,
against the prepared-shard loader and against what a 1B model consumes per GPU.

    python benchmarks/bench_stream.py [--tokenizer DIR] [--workers 0,1,2] [--seconds 20]

The loader is rank 0 of 8 in the 1B recipe's shape: global batch 512 x 256 tokens, so 64 lanes of
its own, each reading one C4-layout shard (copies of the shipped English train shard, as separate
files: a lane reads whole shards, as with C4's 1024). Rates are over `--seconds` after a warm-up
that starts the workers and fills their queues; a step's 64 x 256 slots count whether padded
(paper mode) or not, since the GPU computes them all, and the scored tokens are shown beside them.

Tokenizer: t5-base cannot be downloaded here, and no package on PyPI ships its spiece.model. The
default is a stand-in: a 32,000-piece SentencePiece unigram model with T5's settings, trained on the
shipped English text by the repo's own `python -m tokenizer.train`, loaded as t5-base loads (a
Hugging Face T5 tokenizer: spiece.model plus 100 extra ids, 32,100 entries). Pass --tokenizer to
time another (a local t5-base copy, say).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process, as in the loader's workers
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from common import markdown_table, print_header  # noqa: E402

from megatron_lax.data import tokens as data  # noqa: E402
from megatron_lax.data import streaming  # noqa: E402
from megatron_lax.config import DataConfig, load_config  # noqa: E402
from megatron_lax.models.llama import count_parameters, flops_per_token  # noqa: E402

ENGLISH = REPO / "data" / "english"
GLOBAL_BATCH, SEQ_LEN, MICRO_BATCH, RANKS = 512, 256, 16, 8
# Peak dense BF16 tensor FLOP/s (vendor data sheets) and an MFU well above what the recipes reach,
# so that the demand below is an upper bound.
GPUS = {"A100 (312 TFLOP/s bf16)": 312e12, "H100 SXM (989 TFLOP/s bf16)": 989e12}
MFU = 0.5


def stand_in_tokenizers(directory: Path) -> dict[str, str]:
    """The 32k stand-in for t5-base, as t5-base loads (a Hugging Face T5 tokenizer directory) and as
    the plain SentencePiece model it holds."""
    from megatron_lax.data.train_tokenizer import train_tokenizer
    model = train_tokenizer(sorted(ENGLISH.glob("c4-train.*")) + sorted((REPO / "data" / "sample").glob("c4-train.*")),
                            32000, directory / "spm")
    hf = directory / "t5_stand_in"
    hf.mkdir()
    shutil.copy(model, hf / "spiece.model")
    (hf / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 100,
                                                          "eos_token": "</s>", "unk_token": "<unk>",
                                                          "pad_token": "<pad>"}))
    return {"HF T5 tokenizer (32k stand-in)": str(hf), "SentencePiece (same model)": str(model)}


def write_shards(directory: Path, count: int) -> Path:
    """`count` copies of the English train shard as C4-layout files, and its validation shard."""
    directory.mkdir()
    source = next(ENGLISH.glob("c4-train.*"))
    for i in range(count):
        os.link(source, directory / f"c4-train.{i:05d}-of-{count:05d}.json.gz")
    shutil.copy(next(ENGLISH.glob("c4-validation.*")), directory)
    return directory


def workers_private_mb() -> float:
    """Memory private to this process's children (the loader workers: not the pages they share with
    the training process they were forked from), from /proc."""
    pid, total = os.getpid(), 0
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        for line in Path(f"/proc/{child}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total / 1024


def index_shards(raw: Path, tokenizer: str, cache: Path) -> list[list]:
    """Times counting one shard's documents (paper mode) and their tokens (packed mode), as
    streaming.Index does, and stores each result as the index of every shard: they are copies of
    one file, so the stream does not count them again."""
    from megatron_lax.data.tokenizer import load_tokenizer
    tok = load_tokenizer(tokenizer)
    split = streaming.open_split(str(raw), "train", "train")
    rows = []
    for mode, counter in (("paper", None), ("packed", tok)):
        start = time.perf_counter()
        counted = streaming.count_shard(split, 0, counter)
        seconds = time.perf_counter() - start
        for shard in range(split.n_shards):
            path = streaming.index_path(cache, split, shard, counter.hash if counter else None)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **counted)
        megabytes = split.paths[0].stat().st_size / 1e6
        rows.append([mode, f"{seconds:.2f}", f"{len(counted['sizes']):,}", f"{megabytes / seconds:.1f}",
                     f"{counted['sizes'].sum() / seconds:,.0f}" if counter else "-"])
    return rows


def stream_rate(raw: Path, tokenizer: str, mode: str, workers: int, seconds: float, cache: Path) -> dict:
    """Slots and scored tokens per second that rank 0 of 8 gets from its stream loader, and the
    private memory of its workers at the end."""
    cfg = DataConfig(raw=str(raw), tokenizer=tokenizer, source="stream", stream_cache=str(cache), mode=mode,
                     seq_len=SEQ_LEN, loader_workers=workers)
    loader = streaming.Stream(cfg, rank=0, world_size=RANKS).train_loader(GLOBAL_BATCH, MICRO_BATCH, True)
    per_step = loader.cursor.micro_per_step

    def step() -> int:
        return sum(int((next(loader)[1] != data.IGNORE).sum()) for _ in range(per_step))

    for _ in range(4 * max(workers, 1) + 2):  # workers started, tokenizers loaded, queues full
        step()
    start, steps, scored = time.perf_counter(), 0, 0
    while time.perf_counter() - start < seconds:
        scored += step()
        steps += 1
    elapsed = time.perf_counter() - start
    rss = workers_private_mb() if workers else None
    loader.close()
    slots = steps * loader.per_rank * SEQ_LEN
    return {"slots": slots / elapsed, "scored": scored / elapsed, "rss": rss}


def prepared_rate(raw: Path, tokenizer: str, mode: str, seconds: float, directory: Path) -> float:
    """Slots per second of the prepared-shard loader (rank 0 of 8) on the same documents."""
    path = directory / "prepared"
    if not (path / "manifest.json").is_file():
        single = directory / "one_shard"
        single.mkdir(parents=True, exist_ok=True)
        for f in (next(raw.glob("c4-train.*")), next(raw.glob("c4-validation.*"))):
            shutil.copy(f, single / f.name)
        data.ensure_prepared(DataConfig(path=str(path), raw=str(single), tokenizer=tokenizer))
    loader = data.TrainLoader(path, SEQ_LEN, mode, GLOBAL_BATCH, MICRO_BATCH, 0, RANKS, allow_repetition=True)
    start, batches = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        next(loader)
        batches += 1
    return batches * MICRO_BATCH * SEQ_LEN / (time.perf_counter() - start)


def encode_limit(tokenizer: str, seconds: float) -> float:
    """Tokens/s of one process batch-encoding the English train texts from memory."""
    from collections import Counter

    from megatron_lax.data.readers import iter_documents
    from megatron_lax.data.tokenizer import load_tokenizer
    tok = load_tokenizer(tokenizer)
    texts = list(iter_documents(next(ENGLISH.glob("c4-train.*")), Counter()))
    start, tokens = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for i in range(0, len(texts), streaming.ENCODE_BATCH):
            tokens += sum(len(ids) + 1 for ids in tok.encode_batch(texts[i: i + streaming.ENCODE_BATCH]))
    return tokens / (time.perf_counter() - start)


def demand_rows(per_worker: dict[str, float]) -> list[list]:
    """Tokens/s a 1B model trains on per GPU at MFU 50%, and the loader workers per GPU that supply
    it at each tokenizer's slowest per-worker rate."""
    rows = []
    for method, gate in (("dense", "none"), ("svd", "identity"), ("cola", "identity")):
        model = load_config("llama_1b", {"model.method": method, "model.lax_gate": gate, "model.vocab_size": "32128",
                                         "model.rank": "512"}).model
        flops = flops_per_token(model, SEQ_LEN)["train"]
        for gpu, peak in GPUS.items():
            demand = peak * MFU / flops
            rows.append([f"1B {method}{' + LaX' if gate != 'none' else ''}", f"{count_parameters(model) / 1e9:.2f}B",
                         f"{flops / 1e9:.2f} G", gpu, f"{demand:,.0f}",
                         *(f"{math.ceil(demand / rate)} ({RANKS * math.ceil(demand / rate)})"
                           for rate in per_worker.values())])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", help="a tokenizer to time (default: the 32k stand-in for t5-base, in its "
                                            "two forms)")
    parser.add_argument("--workers", default="0,1,2", help="loader workers per rank to time (1 sizes the workers "
                                                           "per GPU)")
    parser.add_argument("--modes", default="paper,packed")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizers = {args.tokenizer: args.tokenizer} if args.tokenizer else stand_in_tokenizers(tmp)
        raw = write_shards(tmp / "c4", GLOBAL_BATCH // RANKS)
        print_header("Streamed training data: tokens/s per loader worker (rank 0 of 8, batch 512 x 256)")
        rows, slowest, indexing = [], {}, []
        for i, (name, tokenizer) in enumerate(tokenizers.items()):
            before = encode_limit(tokenizer, args.seconds / 2)
            indexing += [[name, *row] for row in index_shards(raw, tokenizer, tmp / "cache")]
            for mode in args.modes.split(","):
                prepared = prepared_rate(raw, tokenizer, mode, args.seconds / 4, tmp / f"prepared_{i}")
                rows.append([name, mode, "prepared shards (memory-mapped)", "-", f"{prepared:,.0f}", "-", "-", "-"])
                for workers in (int(w) for w in args.workers.split(",")):
                    rate = stream_rate(raw, tokenizer, mode, workers, args.seconds, tmp / "cache")
                    per = rate["slots"] / max(workers, 1)
                    if workers == 1:  # one worker: a core of its own on this 2-core machine
                        slowest[name] = min(per, slowest.get(name, math.inf))
                    rows.append([name, mode, "stream", workers, f"{rate['slots']:,.0f}", f"{rate['scored']:,.0f}",
                                 f"{per:,.0f}", f"{rate['rss']:,.0f} MB" if workers else "-"])
            limits = (before, encode_limit(tokenizer, args.seconds / 2))
            rows.append([name, "-", "raw batch-encode limit (1 process, texts in memory; better of before / "
                         f"after: {limits[0]:,.0f} / {limits[1]:,.0f})", "-", f"{max(limits):,.0f}", "-", "-", "-"])
        print(markdown_table(["tokenizer", "mode", "loader", "workers", "tokens/s (slots)", "scored tokens/s",
                              "per worker (0: in-process)", "workers' private memory"], rows))
        print("\nThe index a stream builds before its first step (once per corpus, then cached; packed mode counts "
              "tokens, paper mode documents): one shard, its file then reused for the copies\n")
        print(markdown_table(["tokenizer", "mode", "seconds per shard", "documents", "compressed MB/s",
                              "tokens/s"], indexing))
        print(f"\nWhat a 1B model consumes per GPU at MFU {MFU:.0%} (training FLOPs per token from "
              f"megatron_lax.models.llama.flops_per_token at seq {SEQ_LEN}, vocab 32,128), and the loader workers "
              f"per GPU (on 8 GPUs) that supply it at each tokenizer's 1-worker rate above (the slower mode's):\n")
        print(markdown_table(["model", "parameters", "train FLOPs/token", "GPU", "tokens/s per GPU",
                              *(f"workers: {name}" for name in slowest)], demand_rows(slowest)))


if __name__ == "__main__":
    main()
