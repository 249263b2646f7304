"""Tokenize C4-format shards (or JSON lines / plain text, or a hub dataset) into memory-mappable shards:

    python -m data_prep.prepare --input 'c4/en/c4-*.json.gz' --tokenizer t5-base --output DIR --workers 16

DIR/<split>/<shard>.bin        flat token array (uint16 when the vocabulary fits, else uint32), each document + EOS
DIR/<split>/<shard>.idx.npy    int64 document offsets into the .bin (n_documents + 1 entries)
DIR/<split>/<shard>.json       the shard's counts; written last, so its presence means the shard is complete
DIR/manifest.json              tokenizer (hash, vocabulary, ids), inputs with sizes, documents, tokens,
                               skipped records by reason, format version

One process per input file. A re-run skips shards already complete for the same input and tokenizer.
Bad records are skipped and counted; a shard is written under a temporary name and renamed when done.
"""
from __future__ import annotations

import argparse
import glob
import itertools
import json
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from data_prep.readers import SKIP_REASONS, iter_documents, split_of

FORMAT_VERSION = 1
BATCH_DOCUMENTS = 512
INPUT_SUFFIXES = (".json.gz", ".jsonl", ".jsonl.gz", ".json", ".txt", ".txt.gz")


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def shard_name(path: Path) -> str:
    name = path.name
    for suffix in INPUT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# --- one input file -> one shard (runs in a worker process) ---------------------------------------

_worker_tokenizer = None
_worker_progress = None


def _init_worker(tokenizer_spec: str, progress_queue) -> None:
    global _worker_tokenizer, _worker_progress
    from tokenizer import load_tokenizer
    _worker_tokenizer, _worker_progress = load_tokenizer(tokenizer_spec), progress_queue


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def input_record(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path), "bytes": stat.st_size, "mtime": int(stat.st_mtime)}


def shard_is_complete(out_dir: Path, path: Path, tokenizer_hash: str) -> bool:
    meta_path = out_dir / f"{shard_name(path)}.json"
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return False
    same_input = {k: meta["input"].get(k) for k in ("bytes", "mtime")} == {k: v for k, v in input_record(path).items()
                                                                           if k != "path"}
    return same_input and meta.get("tokenizer_hash") == tokenizer_hash


def document_batches(path: Path, skipped: Counter) -> Iterator[list[str]]:
    """Batches of documents, read and parsed on a background thread so that reading overlaps with
    tokenizing (SentencePiece releases the GIL while it encodes)."""
    batches: queue.Queue = queue.Queue(maxsize=4)
    failure: list[BaseException] = []

    def produce():
        batch: list[str] = []
        try:
            for text in iter_documents(path, skipped):
                batch.append(text)
                if len(batch) == BATCH_DOCUMENTS:
                    batches.put(batch)
                    batch = []
            if batch:
                batches.put(batch)
        except BaseException as e:  # re-raised in the consumer
            failure.append(e)
        finally:
            batches.put(None)

    reader = threading.Thread(target=produce, daemon=True)
    reader.start()
    while (batch := batches.get()) is not None:
        yield batch
    reader.join()
    if failure:
        raise failure[0]


def tokenize_file(task: tuple[str, str]) -> dict:
    """Worker: tokenizes one input file into out_dir; returns the shard's metadata."""
    path, out_dir = Path(task[0]), Path(task[1])
    tok = _worker_tokenizer
    dtype = token_dtype(tok.vocab_size)
    name = shard_name(path)
    tmp_bin = out_dir / f"{name}.bin.tmp"
    skipped: Counter = Counter()
    offsets, n_tokens = [0], 0
    with open(tmp_bin, "wb") as out:
        for batch in document_batches(path, skipped):
            encoded = tok.encode_batch(batch)
            batch_tokens = 0
            for ids in encoded:
                ids.append(tok.eos_id)
                batch_tokens += len(ids)
                offsets.append(n_tokens + batch_tokens)
            n_tokens += batch_tokens
            out.write(np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype, count=batch_tokens).tobytes())
            if _worker_progress is not None:
                _worker_progress.put((len(batch), batch_tokens))
    np.save(out_dir / f"{name}.idx.tmp.npy", np.asarray(offsets, dtype=np.int64))
    os.replace(out_dir / f"{name}.idx.tmp.npy", out_dir / f"{name}.idx.npy")
    os.replace(tmp_bin, out_dir / f"{name}.bin")
    meta = {"input": input_record(path), "split": out_dir.name, "shard": name, "documents": len(offsets) - 1,
            "tokens": n_tokens, "skipped": dict(skipped), "tokenizer_hash": tok.hash, "dtype": np.dtype(dtype).name}
    _atomic_json(out_dir / f"{name}.json", meta)
    return meta


# --- the job -------------------------------------------------------------------------------------

def expand_inputs(spec: str) -> list[Path]:
    """A glob, a directory (every known input file in it) or a comma-separated list of either."""
    paths: set[Path] = set()
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if Path(part).is_dir():
            paths.update(p for p in Path(part).iterdir() if p.is_file() and p.name.endswith(INPUT_SUFFIXES))
        else:
            paths.update(Path(p) for p in glob.glob(part) if Path(p).is_file())
    return sorted(paths)


def write_manifest(output: Path, tok, shards: list[dict]) -> dict:
    shards = sorted(shards, key=lambda m: (m["split"], m["shard"]))
    splits: dict = {}
    for meta in shards:
        split = splits.setdefault(meta["split"], {"shards": [], "documents": 0, "tokens": 0})
        split["shards"].append(meta["shard"])
        split["documents"] += meta["documents"]
        split["tokens"] += meta["tokens"]
    skipped = Counter()
    for meta in shards:
        skipped.update(meta["skipped"])
    manifest = {"format_version": FORMAT_VERSION, "tokenizer": tok.describe(),
                "dtype": np.dtype(token_dtype(tok.vocab_size)).name, "splits": splits,
                "inputs": [dict(m["input"], split=m["split"], documents=m["documents"], tokens=m["tokens"],
                                skipped=m["skipped"]) for m in shards],
                "skipped": {reason: skipped.get(reason, 0) for reason in SKIP_REASONS}}
    _atomic_json(output / "manifest.json", manifest)
    return manifest


def prepare(inputs: list[Path], tokenizer_spec: str, output: Path, workers: int = 1, progress: bool = True) -> dict:
    from tokenizer import load_tokenizer

    if not inputs:
        raise FileNotFoundError("no input files matched")
    tok = load_tokenizer(tokenizer_spec)
    output.mkdir(parents=True, exist_ok=True)
    done, todo = [], []
    for path in inputs:
        out_dir = output / split_of(path)
        out_dir.mkdir(exist_ok=True)
        if shard_is_complete(out_dir, path, tok.hash):
            done.append(json.loads((out_dir / f"{shard_name(path)}.json").read_text()))
        else:
            todo.append((str(path), str(out_dir)))
    if todo:
        done += _run_tasks(todo, tokenizer_spec, workers, progress)
    manifest = write_manifest(output, tok, done)
    skipped = ", ".join(f"{k} {v}" for k, v in manifest["skipped"].items() if v) or "none"
    totals = {s: f"{v['documents']} documents / {v['tokens']} tokens" for s, v in manifest["splits"].items()}
    print(f"prepared {output}: {totals}; {len(inputs) - len(todo)} of {len(inputs)} shards already done; "
          f"skipped records: {skipped}", file=sys.stderr)
    return manifest


def _run_tasks(todo: list, tokenizer_spec: str, workers: int, progress: bool) -> list[dict]:
    workers = max(1, min(workers, len(todo)))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    bar = tqdm(desc="prepare", unit=" docs", disable=not progress, dynamic_ncols=True)
    start, tokens, results = time.time(), 0, []
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_spec, queue)) as pool:
        pending = pool.imap_unordered(tokenize_file, todo)
        remaining = len(todo)
        while remaining:
            try:
                results.append(pending.next(timeout=0.2))
                remaining -= 1
            except mp.TimeoutError:
                pass
            while not queue.empty():
                docs, toks = queue.get()
                tokens += toks
                bar.update(docs)
                bar.set_postfix(tok_s=f"{tokens / max(time.time() - start, 1e-9):.0f}", shards=f"{len(results)}/{len(todo)}")
    while not queue.empty():
        bar.update(queue.get()[0])
    bar.close()
    return results


def stream_hub_dataset(name: str, tokenizer_spec: str, output: Path, split: str, max_documents: int) -> dict:
    """Streams a hub dataset (e.g. allenai/c4 with --hub-config en) into C4-layout JSON-lines shards,
    then prepares them like local files."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise ValueError("streaming from the hub needs `pip install datasets`") from None
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ValueError(f"{name}: the hub is offline (HF_HUB_OFFLINE=1); pass local shards instead")
    raw_dir = output / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    target = raw_dir / f"{name.replace('/', '_')}-{split}.00000.jsonl"
    if not target.is_file():
        try:
            rows = load_dataset(name, split=split, streaming=True)
        except Exception as e:  # network and hub errors come in many types
            raise ValueError(f"{name}: could not stream it from the hub: {str(e).splitlines()[0]}") from None
        with open(str(target) + ".tmp", "w") as f:
            for i, row in enumerate(rows):
                if i >= max_documents:
                    break
                f.write(json.dumps({"text": row["text"]}) + "\n")
        os.replace(str(target) + ".tmp", target)
    return prepare([target], tokenizer_spec, output)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="glob, directory, comma-separated list, or a hub dataset name")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory, .model file, HF directory or hub name")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--hub-split", default="train", help="split to stream when --input is a hub dataset")
    parser.add_argument("--hub-max-documents", type=int, default=1_000_000)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        inputs = expand_inputs(args.input)
        if not inputs and "/" in args.input and not any(c in args.input for c in "*?[") \
                and not Path(args.input).exists():
            stream_hub_dataset(args.input, args.tokenizer, args.output, args.hub_split, args.hub_max_documents)
        else:
            prepare(inputs, args.tokenizer, args.output, args.workers, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
