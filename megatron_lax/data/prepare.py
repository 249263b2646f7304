"""Tokenize C4-format shards (or JSON lines / plain text, or a hub dataset) into memory-mappable shards:

    python -m data_prep.prepare --input 'c4/en/c4-*.json.gz' --tokenizer t5-base --output DIR --workers 16
    python -m data_prep.prepare --input allenai/c4 --hub-config en --tokenizer t5-base --output DIR

DIR/<split>/<shard>.bin        flat token array (uint16 when the vocabulary fits, else uint32), each document + EOS
                               (a document always has a token besides EOS: text that tokenizes to nothing is
                               skipped, counted as no_tokens)
DIR/<split>/<shard>.idx.npy    int64 document offsets into the .bin (n_documents + 1 entries)
DIR/<split>/<shard>.json       the shard's counts; written last, so its presence means the shard is complete
DIR/manifest.json              tokenizer (hash, vocabulary, ids), inputs with sizes, documents, tokens,
                               skipped records by reason, format version

One process per input file; with fewer files than workers, each JSON-lines file is cut into contiguous
parts (<shard>.partKKKK-of-NNNN), so every worker has work and the documents keep their order. A re-run
skips files already complete for the same input and tokenizer, whatever parts they were cut into.
Preparing more files, or another split, into an existing DIR adds them to its manifest (with the
same tokenizer only).
Bad records are skipped and counted; a shard is written under a temporary name and renamed when done.
Nothing is written over an input: an output directory that contains an input is refused (except
DIR/raw/, where a hub dataset is streamed to and no shard is ever written), and so are two inputs that
would become the same shard (one stem in one split).
"""
from __future__ import annotations

import argparse
import glob
import itertools
import json
import math
import multiprocessing as mp
import os
import queue
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from .readers import SKIP_REASONS, is_text_file, iter_documents, split_of

FORMAT_VERSION = 2  # 2: files cut into parts; skipped records per split
BATCH_DOCUMENTS = 512
INPUT_SUFFIXES = (".json.gz", ".jsonl", ".jsonl.gz", ".json", ".txt", ".txt.gz")
PART_SUFFIX = re.compile(r"\.part\d+-of-\d+$")
OUTPUT_SUFFIXES = (".bin", ".bin.tmp", ".idx.npy", ".idx.tmp.npy", ".json", ".json.tmp")
HUB_RAW = "raw"  # OUTPUT/raw: where a hub dataset is streamed to before it is prepared


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def shard_name(path: Path, part: tuple[int, int] = (0, 1)) -> str:
    name = path.name
    for suffix in INPUT_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    k, n = part
    return name if n == 1 else f"{name}.part{k:04d}-of-{n:04d}"


# --- one input file -> one shard (runs in a worker process) ---------------------------------------

_worker_tokenizer = None
_worker_progress = None


def _init_worker(tokenizer_spec: str, progress_queue) -> None:
    global _worker_tokenizer, _worker_progress
    from .tokenizer import load_tokenizer
    _worker_tokenizer, _worker_progress = load_tokenizer(tokenizer_spec), progress_queue


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def input_record(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path), "bytes": stat.st_size, "mtime": int(stat.st_mtime)}


def completed_shards(out_dir: Path, path: Path, tokenizer_hash: str) -> list[dict] | None:
    """The shard metadata of `path` when every part of it is done for this input and tokenizer."""
    name = glob.escape(shard_name(path))
    metas = []
    for meta_path in glob.glob(str(out_dir / f"{name}.json")) + glob.glob(str(out_dir / f"{name}.part*-of-*.json")):
        try:
            metas.append(json.loads(Path(meta_path).read_text()))
        except json.JSONDecodeError:
            continue
    current = {k: v for k, v in input_record(path).items() if k != "path"}
    metas = [m for m in metas if m.get("format_version") == FORMAT_VERSION and m["tokenizer_hash"] == tokenizer_hash
             and {k: m["input"].get(k) for k in current} == current]
    for n in {m["part"][1] for m in metas}:
        parts = sorted((m for m in metas if m["part"][1] == n), key=lambda m: m["part"][0])
        if [m["part"][0] for m in parts] == list(range(n)):
            return parts
    return None


def remove_outputs(out_dir: Path, path: Path) -> None:
    """Deletes whatever an earlier, unfinished or outdated run left for `path`."""
    name = glob.escape(shard_name(path))
    for base in (name, f"{name}.part*-of-*"):
        for suffix in OUTPUT_SUFFIXES:
            for stale in map(Path, glob.glob(str(out_dir / (base + suffix)))):
                if stale.resolve() != path.resolve():
                    stale.unlink()


def document_batches(path: Path, part: tuple[int, int], skipped: Counter) -> Iterator[list[str]]:
    """Batches of documents, read and parsed on a background thread so that reading overlaps with
    tokenizing (SentencePiece releases the GIL while it encodes)."""
    batches: queue.Queue = queue.Queue(maxsize=4)
    failure: list[BaseException] = []

    def produce():
        batch: list[str] = []
        try:
            for text in iter_documents(path, skipped, part=part):
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


def tokenize_file(task: tuple[str, str, tuple[int, int]]) -> dict:
    """Worker: tokenizes one input file, or one part of it, into out_dir; returns the shard's metadata."""
    path, out_dir, part = Path(task[0]), Path(task[1]), tuple(task[2])
    tok = _worker_tokenizer
    dtype = token_dtype(tok.vocab_size)
    name = shard_name(path, part)
    skipped: Counter = Counter()
    offsets, n_tokens = [0], 0
    with open(out_dir / f"{name}.bin.tmp", "wb") as out:
        for batch in document_batches(path, part, skipped):
            encoded = tok.encode_batch(batch)
            skipped.update("no_tokens" for ids in encoded if not ids)  # e.g. only zero-width characters
            encoded = [ids for ids in encoded if ids]
            batch_tokens = 0
            for ids in encoded:
                ids.append(tok.eos_id)
                batch_tokens += len(ids)
                offsets.append(n_tokens + batch_tokens)
            n_tokens += batch_tokens
            out.write(np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype, count=batch_tokens).tobytes())
            if _worker_progress is not None:
                _worker_progress.put((len(batch), batch_tokens))
    return finish_shard(out_dir, name, np.asarray(offsets, dtype=np.int64), source=input_record(path), part=part,
                        skipped=skipped, tokenizer_hash=tok.hash, dtype=dtype)


def finish_shard(out_dir: Path, name: str, offsets: np.ndarray, *, source: dict, part: tuple[int, int],
                 skipped: Counter, tokenizer_hash: str, dtype) -> dict:
    """Publishes a shard whose tokens are written to <name>.bin.tmp: its document offsets, then its
    tokens, then its metadata (returned), whose presence means the shard is complete."""
    np.save(out_dir / f"{name}.idx.tmp.npy", offsets)
    os.replace(out_dir / f"{name}.idx.tmp.npy", out_dir / f"{name}.idx.npy")
    os.replace(out_dir / f"{name}.bin.tmp", out_dir / f"{name}.bin")
    meta = {"format_version": FORMAT_VERSION, "input": source, "split": out_dir.name, "shard": name,
            "part": list(part), "documents": len(offsets) - 1, "tokens": int(offsets[-1]), "skipped": dict(skipped),
            "tokenizer_hash": tokenizer_hash, "dtype": np.dtype(dtype).name}
    _atomic_json(out_dir / f"{name}.json", meta)
    return meta


def write_shard(out_dir: Path, name: str, tokens: np.ndarray, offsets: np.ndarray, source: dict,
                tokenizer_hash: str) -> dict:
    """Writes already tokenized documents (tokens in the data's dtype, int64 document offsets) as one
    shard, exactly as tokenize_file does; for synthetic data sets."""
    tokens.tofile(out_dir / f"{name}.bin.tmp")
    return finish_shard(out_dir, name, offsets, source=source, part=(0, 1), skipped=Counter(),
                        tokenizer_hash=tokenizer_hash, dtype=tokens.dtype)


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


def _skip_counts(shards: list[dict]) -> dict:
    total = Counter()
    for meta in shards:
        total.update(meta["skipped"])
    return {reason: total.get(reason, 0) for reason in SKIP_REASONS}


def write_manifest(output: Path, tok, shards: list[dict]) -> dict:
    """Writes DIR/manifest.json, leaving the file untouched when nothing changed."""
    shards = sorted(shards, key=lambda m: (m["split"], m["shard"]))
    splits = {}
    for name in sorted({m["split"] for m in shards}):
        mine = [m for m in shards if m["split"] == name]
        splits[name] = {"shards": [m["shard"] for m in mine], "documents": sum(m["documents"] for m in mine),
                        "tokens": sum(m["tokens"] for m in mine), "skipped": _skip_counts(mine)}
    inputs = {}
    for m in shards:
        entry = inputs.setdefault(m["input"]["path"], dict(m["input"], split=m["split"], documents=0, tokens=0,
                                                           skipped=Counter()))
        entry["documents"] += m["documents"]
        entry["tokens"] += m["tokens"]
        entry["skipped"].update(m["skipped"])
    manifest = {"format_version": FORMAT_VERSION, "tokenizer": tok.describe(),
                "dtype": np.dtype(token_dtype(tok.vocab_size)).name, "splits": splits,
                "inputs": [dict(entry, skipped=dict(entry["skipped"])) for entry in inputs.values()],
                "skipped": _skip_counts(shards)}
    path = output / "manifest.json"
    if not path.is_file() or json.loads(path.read_text()) != manifest:
        _atomic_json(path, manifest)
    return manifest


def prepare(inputs: list[Path], tokenizer_spec: str, output: Path, workers: int = 1, progress: bool = True) -> dict:
    from .tokenizer import load_tokenizer

    if not inputs:
        raise FileNotFoundError("no input files matched")
    check_inputs(inputs, output)
    tok = load_tokenizer(tokenizer_spec)
    output.mkdir(parents=True, exist_ok=True)
    earlier = earlier_shards(output, tok, inputs)
    done, todo = [], []
    for path in inputs:
        out_dir = output / split_of(path)
        out_dir.mkdir(exist_ok=True)
        complete = completed_shards(out_dir, path, tok.hash)
        if complete:
            done += complete
        else:
            todo.append((path, out_dir))
    if todo:
        done += _run_tasks(split_into_parts(todo, workers), tokenizer_spec, workers, progress)
    manifest = write_manifest(output, tok, earlier + done)
    skipped = ", ".join(f"{k} {v}" for k, v in manifest["skipped"].items() if v) or "none"
    totals = "; ".join(f"{s} {v['documents']:,} documents, {v['tokens']:,} tokens" for s, v in manifest["splits"].items())
    print(f"prepared {output}: {totals}; {len(inputs) - len(todo)} of {len(inputs)} inputs already done; "
          f"skipped records: {skipped}", file=sys.stderr)
    return manifest


def check_inputs(inputs: list[Path], output: Path) -> None:
    """Refuses, before anything is written, what would write over an input: an output directory that
    contains an input (outside OUTPUT/raw/), or two inputs that would be written as one shard."""
    out = output.resolve()
    for path in inputs:
        if path.resolve().is_relative_to(out) and not path.resolve().is_relative_to(out / HUB_RAW):
            raise ValueError(f"--output {output} contains the input {path}: preparing there could write over it; "
                             f"choose an output directory that holds no input")
    shards: dict[tuple[str, str], Path] = {}
    for path in inputs:
        key = (split_of(path), shard_name(path))
        other = shards.setdefault(key, path)
        if other.resolve() != path.resolve():
            raise ValueError(f"the inputs {other} and {path} would both be written as the shard {'/'.join(key)}; "
                             f"rename one of them")


def earlier_shards(output: Path, tok, inputs: list[Path]) -> list[dict]:
    """The shards that output/manifest.json lists for files other than `inputs`, so that preparing
    more files, or another split, extends the manifest. Refuses a directory prepared with another
    tokenizer; a listed shard whose files are gone is dropped, with a warning."""
    manifest_path = output / "manifest.json"
    if not manifest_path.is_file():
        return []
    try:
        manifest = json.loads(manifest_path.read_text())
        theirs, splits = manifest["tokenizer"], manifest["splits"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{manifest_path}: not a manifest ({type(e).__name__}: {e}); delete it and prepare all "
                         f"the inputs again (finished shards are reused)") from None
    if theirs["hash"] != tok.hash:
        raise ValueError(f"{output} holds data prepared with tokenizer {theirs['name']} (hash {theirs['hash']}), "
                         f"not {tok.name} (hash {tok.hash}); prepare into another directory")
    rerun = {(split_of(path), shard_name(path)) for path in inputs}
    kept, gone = [], []
    for split, entry in splits.items():
        for name in entry["shards"]:
            if (split, PART_SUFFIX.sub("", name)) in rerun:
                continue
            meta = _complete_shard(output / split, name, tok.hash)
            if meta is None:
                gone.append(f"{split}/{name}")
            else:
                kept.append(meta)
    if gone:
        print(f"warning: dropping from {manifest_path} {len(gone)} listed shard(s) whose files are missing or "
              f"incomplete: {', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''}", file=sys.stderr)
    return kept


def _complete_shard(out_dir: Path, name: str, tokenizer_hash: str) -> dict | None:
    """A shard's metadata when its files are all there and it belongs to this tokenizer."""
    try:
        meta = json.loads((out_dir / f"{name}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    files_there = all((out_dir / f"{name}{suffix}").is_file() for suffix in (".bin", ".idx.npy"))
    if not files_there or meta.get("format_version") != FORMAT_VERSION or meta.get("tokenizer_hash") != tokenizer_hash:
        return None
    return meta


def split_into_parts(todo: list[tuple[Path, Path]], workers: int) -> list[tuple[str, str, tuple[int, int]]]:
    """One task per file, or, with fewer files than workers, enough parts per JSON-lines file to
    give every worker one."""
    n = max(1, math.ceil(workers / len(todo)))
    tasks = []
    for path, out_dir in todo:
        remove_outputs(out_dir, path)
        parts = 1 if is_text_file(path) else n
        tasks += [(str(path), str(out_dir), (k, parts)) for k in range(parts)]
    return tasks


def _run_tasks(todo: list, tokenizer_spec: str, workers: int, progress: bool) -> list[dict]:
    workers = max(1, min(workers, len(todo)))
    ctx = mp.get_context("spawn")
    progress_queue = ctx.Queue()
    bar = tqdm(desc="prepare", unit=" docs", disable=not progress, dynamic_ncols=True)
    start, tokens, results = time.time(), 0, []
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_spec, progress_queue)) as pool:
        pending = pool.imap_unordered(tokenize_file, todo)
        remaining = len(todo)
        while remaining:
            try:
                results.append(pending.next(timeout=0.2))
                remaining -= 1
            except mp.TimeoutError:
                pass
            while not progress_queue.empty():
                docs, toks = progress_queue.get()
                tokens += toks
                bar.update(docs)
                bar.set_postfix(tok_s=f"{tokens / max(time.time() - start, 1e-9):.0f}", parts=f"{len(results)}/{len(todo)}")
    while not progress_queue.empty():
        bar.update(progress_queue.get()[0])
    bar.close()
    return results


def stream_hub_dataset(name: str, config: str | None, splits: list[str], max_documents: int, raw_dir: Path) -> list[Path]:
    """Streams the first max_documents records of each split of a hub dataset (e.g. allenai/c4,
    config en) into JSON-lines files named after the split, which then prepare like local files."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise ValueError(f"{name} is not a local file; streaming it from the hub needs `pip install datasets`") from None
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ValueError(f"{name}: the hub is offline (HF_HUB_OFFLINE=1); pass local shards instead")
    raw_dir.mkdir(parents=True, exist_ok=True)
    targets = []
    for split in splits:
        target = raw_dir / f"{name.replace('/', '_')}-{split}.jsonl"
        if not target.is_file():
            try:
                rows = load_dataset(name, config, split=split, streaming=True)
                with open(f"{target}.tmp", "w") as f:
                    for row in itertools.islice(rows, max_documents):
                        f.write(json.dumps({"text": row["text"]}, ensure_ascii=False) + "\n")
            except Exception as e:  # network and hub errors come in many types
                raise ValueError(f"{name}: could not stream split {split} from the hub: {str(e).splitlines()[0]}") from None
            os.replace(f"{target}.tmp", target)
        targets.append(target)
    return targets


def looks_like_hub_name(spec: str) -> bool:
    """hf:OWNER/NAME, or OWNER/NAME where no local OWNER folder exists (data/smaple is a mistyped path)."""
    if spec.startswith("hf:"):
        return True
    return spec.count("/") == 1 and not any(c in spec for c in "*?[,") and not Path(spec).exists() \
        and not Path(spec).parent.is_dir()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="glob, directory, comma-separated list, or a hub dataset name (hf:OWNER/NAME)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory, .model file, HF directory or hub name")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--hub-config", default=None, help="hub dataset configuration (allenai/c4: en)")
    parser.add_argument("--hub-splits", default="train,validation", help="splits to stream from a hub dataset")
    parser.add_argument("--hub-max-documents", type=int, default=1_000_000, help="per split")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        inputs = expand_inputs(args.input)
        if not inputs and looks_like_hub_name(args.input):
            inputs = stream_hub_dataset(args.input.removeprefix("hf:"), args.hub_config, args.hub_splits.split(","),
                                        args.hub_max_documents, args.output / HUB_RAW)
        elif not inputs:
            raise FileNotFoundError(f"--input {args.input}: no such file, and no file matches it (a hub dataset is "
                                    f"written hf:OWNER/NAME)")
        prepare(inputs, args.tokenizer, args.output, args.workers, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
