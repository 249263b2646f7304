"""Pre-training straight from C4-layout shards, local or on the Hugging Face hub, with no preparation
pass: loader workers tokenise documents while training reads them (`data.source stream`).

    data.raw  DIR | GLOB | a comma-separated list of them       local .json.gz / .jsonl / .txt shards
              hf:OWNER/NAME[/CONFIG]                             a hub dataset, e.g. hf:allenai/c4/en

Index. Before the first step every train shard is read once to count its documents and, in packed
mode, tokenised to count their tokens (Index; rank r counts shards r, r+W, ...), cached under
data.stream_cache for later runs.
Records that are not documents are counted by reason and reported with each validation; a shard with
no readable document is named and skipped.

Lanes. A step of G sequences has G slots, and slot j of every step comes from lane j. Weighted
sources (data.sources) get their share of the lanes (lanes_by_weight). Pass p of a source reads its
shards in a seeded order, and its lanes take equal contiguous ranges of that pass's tokens (paper
mode: of its documents), a border document split between two (SourcePlan). So every lane of a source
holds the same number of windows: every document is read once per pass, whatever the shards' sizes
and the number of lanes, and a pass ends for every lane at the same step. A lane reads its range in
the order of a seeded shuffle buffer (data.shuffle_buffer documents), tokenises it and cuts it as
data.Sequences does: packed (documents joined by EOS, a window of seq_len + 1 tokens every seq_len
tokens) or paper (one document per sequence, truncated as GaLore and CoLA do: its first seq_len
tokens then EOS; padding not scored). Rank r owns lanes [r G/W, (r+1) G/W) and splits them among its
loader workers; the data of a step does not depend on how many ranks or workers share it. A budget
longer than one pass (the first source's) is refused unless train.allow_repetition.

Resume. Where every lane is follows from the step alone, so the loader's state is data/cursor.py's
GlobalBatchCursor (epoch = pass, step, micro-batch): any number of ranks dividing G continues the
stream exactly at a step boundary; a restored lane re-reads its range up to its place without
tokenising the documents before it.

Validation is the first sequences of the validation split holding the validation tokens (the rule of
data.validation_sequence_ids, so the same tokens as prepared shards of the same files give), read once
on rank 0, cached under data.stream_cache and broadcast: identical on every run and rank count.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .prepare import expand_inputs
from .readers import iter_documents, split_of, usable_text
from .tokenizer import check_hub_reachable

from . import tokens as data
from .cursor import GlobalBatchCursor
from ..parallel.distributed import all_gather_object, broadcast_object, is_distributed

HUB_PREFIX = "hf:"
HUB_DEFAULT_CONFIG = {"allenai/c4": "en"}
ENCODE_BATCH = 32  # documents a lane tokenises per call
READ_CHUNK = 64 << 10  # bytes a lane reads from its file at a time (it holds a few times that, decompressed)
# Paper mode keeps a document's first seq_len + 1 tokens: a long text is tokenised from a prefix of
# CHARS_PER_TOKEN characters per token kept, cut at a space or newline, when that prefix still gives
# PREFIX_MARGIN tokens more than are kept (else the whole text is). C4 documents average ~480 T5
# tokens, so this halves the tokenising at seq_len 256.
CHARS_PER_TOKEN, PREFIX_MARGIN = 6, 16
# Train tokens the unigram baseline counts: data.unigram_perplexity counts 50M of prepared shards, but
# tokenising that many would hold rank 0 for minutes at the end of a run (t5-base: ~0.2M tokens/s).
UNIGRAM_TOKENS = 5_000_000
STATE_FORMAT = 2  # 1: a cursor per lane (before every lane held the same number of windows)


class StreamError(ValueError):
    """A streamed source that cannot be read; the message is one line."""


# --- where documents come from ---------------------------------------------------------------------

class LocalSplit:
    """The local files of one split, read with data/readers.py (bad records skipped and counted)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.n_shards = len(paths)
        self.fingerprint = [[p.name, p.stat().st_size] for p in paths]

    def shard_name(self, shard: int) -> str:
        return str(self.paths[shard])

    def shard_fingerprint(self, shard: int) -> list:
        stat = self.paths[shard].stat()
        return [str(self.paths[shard].resolve()), stat.st_size, stat.st_mtime_ns]

    def documents(self, shard: int, skipped: Counter) -> Iterator[str]:
        return iter_documents(self.paths[shard], skipped, chunk_size=READ_CHUNK)


class HubSplit:
    """One split of a hub dataset, streamed by `datasets`; its shards are the dataset's files. A read
    error is retried (READ_RETRIES times, backing off) from the document where it stopped."""

    READ_RETRIES, BACKOFF_SECONDS = 5, 2.0

    def __init__(self, spec: str, name: str, config: str | None, split: str, shared: bool = True):
        """Rank 0 opens the dataset (the hub's file list) and sends it to the other ranks (a collective;
        `shared` False: this rank opens it alone)."""
        self.spec, self.split = spec, split
        opened = None
        if _rank() == 0 or not shared:
            try:
                opened = self._open(name, config)
            except StreamError as e:
                opened = e
        if shared:
            opened = broadcast_object(opened)
        if isinstance(opened, StreamError):
            raise opened
        self.dataset = opened
        self.n_shards = getattr(self.dataset, "num_shards", None) or self.dataset.n_shards
        self.fingerprint = [name, config, split, self.n_shards]

    def _open(self, name: str, config: str | None):
        try:
            from datasets import load_dataset
        except ImportError:
            raise StreamError(f"{self.spec}: streaming from the hub needs `datasets` (pip install "
                              f"'megatron-lax[stream]')") from None
        if not Path(name).is_dir():
            try:
                check_hub_reachable()
            except ValueError as e:
                raise StreamError(f"{self.spec}: {e}") from None
        try:
            with _quiet_hub():
                return load_dataset(name, config, split=self.split, streaming=True)
        except Exception as e:  # offline, unknown name or split, network: many types
            raise StreamError(f"{self.spec}: cannot open split {self.split!r} on the Hugging Face hub "
                              f"({type(e).__name__}: {_first_line(e)})") from None

    def shard_name(self, shard: int) -> str:
        return f"{self.spec} {self.split} shard {shard}"

    def shard_fingerprint(self, shard: int) -> list:
        return [*self.fingerprint, shard]

    def rows(self, shard: int):
        return self.dataset.shard(self.n_shards, shard)

    def documents(self, shard: int, skipped: Counter) -> Iterator[str]:
        """The documents of a shard; a failed read is retried from the row after the last one read."""
        read, failures = 0, 0
        while True:
            try:
                for row in itertools.islice(self.rows(shard), read, None):
                    read += 1
                    text = row.get("text")
                    if usable_text(text, skipped):
                        yield text
                return
            except Exception as e:  # network errors come in many types
                failures += 1
                if failures > self.READ_RETRIES:
                    raise StreamError(f"{self.spec}: reading shard {shard} of split {self.split!r} failed "
                                      f"{failures} times ({type(e).__name__}: {_first_line(e)})") from None
                print(f"warning: {self.spec}: reading shard {shard} failed at row {read} ({type(e).__name__}); "
                      f"retry {failures} of {self.READ_RETRIES}", file=sys.stderr)
                time.sleep(self.BACKOFF_SECONDS * 2 ** (failures - 1))


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


@contextlib.contextmanager
def _quiet_hub():
    """The hub client logs each retry of an unreachable host; the error we raise says it once."""
    try:
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:
        yield
        return
    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(level)


def parse_hub_spec(spec: str) -> tuple[str, str | None] | None:
    """(dataset name, config) of hf:OWNER/NAME[/CONFIG], or None for a local source."""
    if not spec.startswith(HUB_PREFIX):
        return None
    parts = spec[len(HUB_PREFIX):].strip("/").split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise StreamError(f"data.raw {spec}: a hub source is hf:OWNER/NAME or hf:OWNER/NAME/CONFIG")
    name = "/".join(parts[:2])
    return name, parts[2] if len(parts) == 3 else HUB_DEFAULT_CONFIG.get(name)


def open_split(spec: str, split: str, hub_split: str, shared: bool = True):
    """The train or validation split of data.raw (hub datasets: under the name `hub_split`; with
    `shared`, opened by rank 0 for all ranks, a collective)."""
    hub = parse_hub_spec(spec)
    if hub:
        return HubSplit(spec, *hub, hub_split, shared)
    paths = [p for p in expand_inputs(spec) if split_of(p) == split]
    if not paths:
        raise StreamError(f"data.raw {spec}: no {split} shards there (C4 names them c4-{split}.*.json.gz)")
    return LocalSplit(paths)


# --- the index: every train document's size, read once ---------------------------------------------

def _cached_npz(path: Path, compute, what: str) -> dict:
    """np.load(path) as a dict, or compute() saved there first (atomically: concurrent writers are
    harmless). A cache file that cannot be read (empty, cut short) is named in one line and rebuilt."""
    if path.is_file():
        try:
            with np.load(path) as saved:
                return {k: saved[k] for k in saved.files}
        except Exception as e:  # zero bytes: EOFError; cut short: BadZipFile, ValueError, OSError
            print(f"warning: {path}: unreadable {what} cache ({type(e).__name__}); read again", file=sys.stderr)
    arrays = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return arrays


def _counter_array(skipped: Counter) -> np.ndarray:
    return np.array(json.dumps(dict(skipped), sort_keys=True))


def count_shard(split, shard: int, tok=None) -> dict:
    """{"sizes": each readable document's tokens with EOS (0: none, skipped), or 1 per document
    without `tok`; "skipped": what was dropped, by reason}. A file that cannot be opened is counted
    as unreadable_file."""
    skipped, sizes = Counter(), []
    try:
        documents = split.documents(shard, skipped)
        while batch := list(itertools.islice(documents, ENCODE_BATCH)):
            sizes += [len(ids) + 1 if ids else 0 for ids in tok.encode_batch(batch)] if tok else [1] * len(batch)
    except OSError:
        skipped["unreadable_file"] += 1
    skipped["no_tokens"] += sizes.count(0)
    return {"sizes": np.asarray(sizes, dtype=np.int32), "skipped": _counter_array(+skipped)}


def _count_into_cache(job: tuple) -> None:
    """A pool worker's share of Index: one shard counted into its cache file."""
    from .tokenizer import load_tokenizer
    split, shard, tokenizer, path = job
    _cached_npz(path, lambda: count_shard(split, shard, load_tokenizer(tokenizer) if tokenizer else None),
                "document index")


def index_path(cache: Path, split, shard: int, tokenizer_hash: str | None) -> Path:
    """Where a shard's index is cached (tokenizer_hash None: documents only)."""
    return cache / f"index-{_digest({'shard': split.shard_fingerprint(shard), 'tokenizer': tokenizer_hash})}.npz"


class Index:
    """The document sizes of a split, shard by shard, and what its files hold that is not a document.
    Built once per (files, tokenizer) and cached under data.stream_cache, one file per shard, in
    parallel by the ranks (rank r counts shards r, r + W, ...). Ranks share only each shard's totals;
    a shard's per-document sizes are loaded from the cache when a lane reaches it (counted again by
    a rank whose cache folder is not shared), so a rank holds a few shards' sizes at a time."""

    LOADED = 8  # shards' sizes held at once

    def __init__(self, split, tok, cache: Path, name: str = "train", workers: int = 0):
        """`tok` None: documents are counted, not tokenised (paper mode, where a document is a
        sequence whatever its length: a reading pass, much cheaper than tokenising). `workers`
        processes count this rank's local shards that are not cached yet."""
        self.split, self.tok, self.cache, self._loaded = split, tok, cache, {}
        shards = range(_rank(), split.n_shards, _world())
        if workers > 1 and isinstance(split, LocalSplit):
            self._count_in_parallel([s for s in shards if not self._path(s).is_file()], workers)
        mine = {}
        for shard in shards:
            sizes, skipped = self._read(shard)
            mine[shard] = (int(sizes.sum()), int((sizes > 0).sum()), dict(skipped))
        found = {}
        for share in all_gather_object(mine) if is_distributed() else [mine]:
            found.update(share)
        self.tokens = np.array([found[s][0] for s in range(split.n_shards)], dtype=np.int64)
        self.documents = np.array([found[s][1] for s in range(split.n_shards)], dtype=np.int64)
        self.skipped = sum((Counter(found[s][2]) for s in range(split.n_shards)), Counter())
        self.empty = [split.shard_name(s) for s in range(split.n_shards) if not self.documents[s]]
        if self.empty and _rank() == 0:
            shown = ", ".join(self.empty[:3]) + (f" and {len(self.empty) - 3} more" if len(self.empty) > 3 else "")
            print(f"warning: {name} shard(s) {shown} hold no readable document; skipped", file=sys.stderr)
        if not self.documents.any():
            raise StreamError(f"no {name} shard of the stream holds a readable document "
                              f"({', '.join(self.empty[:3])}...)")

    def _path(self, shard: int) -> Path:
        return index_path(self.cache, self.split, shard, self.tok.hash if self.tok else None)

    def _count_in_parallel(self, shards: list[int], workers: int) -> None:
        import multiprocessing
        spec = self.tok.name if self.tok else None
        with multiprocessing.get_context("fork").Pool(min(workers, max(len(shards), 1))) as pool:
            pool.map(_count_into_cache, [(self.split, shard, spec, self._path(shard)) for shard in shards])

    def _read(self, shard: int) -> tuple[np.ndarray, Counter]:
        arrays = _cached_npz(self._path(shard), lambda: count_shard(self.split, shard, self.tok), "document index")
        return arrays["sizes"], Counter(json.loads(str(arrays["skipped"])))

    def sizes(self, shard: int) -> np.ndarray:
        """Each readable document's tokens with EOS (0: it has none) in shard `shard`."""
        if shard not in self._loaded:
            if len(self._loaded) >= self.LOADED:
                self._loaded.pop(next(iter(self._loaded)))
            self._loaded[shard] = self._read(shard)[0]
        return self._loaded[shard]

    def __getstate__(self):  # what a loader worker receives: no shard's sizes
        return {**self.__dict__, "_loaded": {}}


def _rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def _world() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


# --- passes and lanes ------------------------------------------------------------------------------

def buffer_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffle buffer of `size` emits items 0..n-1 that enter it in order: when
    full, it emits a uniformly drawn item and takes the next in its place; at the end it empties in
    a random order. An item leaves at most a few times `size` places from where it entered, so a
    reader holds O(size) documents."""
    if size <= 1 or n <= 1:
        return np.arange(n)
    buffer = list(range(min(size, n)))
    picks = rng.integers(0, len(buffer), max(0, n - len(buffer))).tolist()
    out = []
    for i, j in zip(range(len(buffer), n), picks):
        out.append(buffer[j])
        buffer[j] = i
    return np.concatenate([np.asarray(out, dtype=np.int64), rng.permutation(buffer)]).astype(np.int64)


class SourcePlan:
    """How one source's train split is dealt to its lanes, pass by pass.

    Pass p reads the shards in a seeded order of its own (data.Permutation of (seed, source, p)); its
    documents, in that order, are one stream of units (packed: tokens with EOS; paper: documents),
    and lane k of n takes the k-th of n equal contiguous ranges of it (a document on a border is
    split between two lanes; each lane trains on its own part). So every lane holds the same number
    of windows, `windows` (packed: (units - 1) // seq_len, paper: units), the pass ends for all of
    them at the same step, and at most n (seq_len + 1) tokens of a pass are not trained on. Inside a
    lane a seeded shuffle buffer (data.shuffle_buffer documents) mixes the order of its documents."""

    def __init__(self, name: str, index: Index, lanes: list[int], seed: int, key: int, mode: str, seq_len: int,
                 buffer: int):
        self.name, self.index, self.lanes, self.seed, self.key = name, index, lanes, seed, key
        self.mode, self.seq_len, self.buffer = mode, seq_len, buffer
        self.shard_units = index.tokens if mode == "packed" else index.documents
        self.per_lane = int(self.shard_units.sum()) // len(lanes)
        self.windows = (self.per_lane - 1) // seq_len if mode == "packed" else self.per_lane
        if self.windows < 1:
            raise StreamError(f"source {name}: {int(self.shard_units.sum()):,} "
                              f"{'tokens' if mode == 'packed' else 'documents'} do not fill one "
                              f"{'window' if mode == 'packed' else 'sequence'} for each of its {len(lanes)} lanes")

    def shard_order(self, pass_: int) -> np.ndarray:
        n = len(self.shard_units)
        return data.Permutation(n, self.seed, self.key, pass_)(np.arange(n))

    def lane_items(self, k: int, pass_: int) -> np.ndarray:
        """Lane k's documents in pass order: rows (shard, document, first unit, end unit, tokens)."""
        order = self.shard_order(pass_)
        ends = np.cumsum(self.shard_units[order])
        start, end = k * self.per_lane, (k + 1) * self.per_lane
        rows, first = [], int(np.searchsorted(ends, start, side="right"))
        for i in range(first, len(order)):
            base = int(ends[i] - self.shard_units[order[i]])
            if base >= end:
                break
            sizes = self.index.sizes(int(order[i])).astype(np.int64)
            units = sizes if self.mode == "packed" else (sizes > 0).astype(np.int64)
            doc_end = base + np.cumsum(units)
            docs = np.nonzero((units > 0) & (doc_end > start) & (doc_end - units < end))[0]
            lo = np.maximum(start - (doc_end[docs] - units[docs]), 0)
            hi = np.minimum(end - (doc_end[docs] - units[docs]), units[docs])
            rows.append(np.stack([np.full(len(docs), order[i]), docs, lo, hi, sizes[docs]], axis=1))
        return np.concatenate(rows).astype(np.int32) if rows else np.empty((0, 5), dtype=np.int32)

    def lane_order(self, k: int, pass_: int, n: int) -> np.ndarray:
        return buffer_order(n, self.buffer, np.random.default_rng([self.seed, self.key, pass_, self.lanes[k]]))

    def describe(self) -> dict:
        return {"name": self.name, "source": self.index.split.fingerprint, "lanes": self.lanes, "seed": self.seed,
                "buffer": self.buffer}


def _prefix(text: str, limit: int) -> str:
    """The text up to the last space or newline before `limit` characters (all of it if shorter)."""
    if len(text) <= limit:
        return text
    cut = max(text.rfind(" ", 0, limit), text.rfind("\n", 0, limit))
    return text[:cut] if cut > 0 else text


def encode_documents(tok, texts: list[str], skipped: Counter, max_tokens: int = 0) -> list[np.ndarray | None]:
    """Each text's tokens followed by EOS (int32), None for one that tokenises to nothing (counted).
    With max_tokens, the first max_tokens - 1 tokens of a longer text then EOS (GaLore's and CoLA's
    truncation), tokenised from a prefix of a long text: exactly the same tokens for tokenizers whose
    pieces never cross whitespace (SentencePiece's default, T5's, byte-level BPE's pre-tokenizer), and
    the prefix is only used when it reaches PREFIX_MARGIN tokens past the ones kept."""
    if not max_tokens:
        encoded = tok.encode_batch(texts)
    else:
        prefixes = [_prefix(t, max_tokens * CHARS_PER_TOKEN) for t in texts]
        encoded = tok.encode_batch(prefixes)
        short = [i for i, (p, t, ids) in enumerate(zip(prefixes, texts, encoded))
                 if len(p) < len(t) and len(ids) < max_tokens + PREFIX_MARGIN]
        for i, ids in zip(short, tok.encode_batch([texts[i] for i in short]) if short else []):
            encoded[i] = ids
    out = []
    for ids in encoded:
        if ids:
            kept = ids[: max_tokens - 1] if max_tokens else ids  # a truncated document still ends in EOS
            out.append(np.asarray(kept + [tok.eos_id], dtype=np.int32))
        else:
            skipped["no_tokens"] += 1
            out.append(None)
    return out


def _padded(tokens: list[int], T: int) -> np.ndarray:
    """A paper-mode window: a document's tokens as encode_documents keeps them, -1 where they pad."""
    window = np.full(T + 1, -1, dtype=np.int32)
    window[: len(tokens)] = tokens
    return window


class Lane:
    """One lane's windows (seq_len + 1 token ids; paper mode: -1 past a document's end), from global
    step `step` on: window step % windows of pass step // windows of its source."""

    def __init__(self, plan: SourcePlan, k: int, tok, step: int, skipped: Counter):
        self.plan, self.k, self.tok, self.skipped = plan, k, tok, skipped
        self.T = plan.seq_len
        self.windows = self._windows(step)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids (paper mode: its window's tokens, EOS included; see encode_documents)."""
        if self.plan.mode == "packed":
            return self.tok.encode_batch(texts)
        eos = [self.tok.eos_id]  # a document without tokens: a window that scores nothing
        return [eos if t is None else t.tolist() for t in encode_documents(self.tok, texts, Counter(), self.T + 1)]

    def _documents(self, items: np.ndarray, order: np.ndarray, first: int) -> Iterator[tuple[np.ndarray, list]]:
        """(item row, its tokens) from output position `first` of the lane's shuffled order; the lane's
        files are read once, in order, holding the documents that wait for their turn."""
        needed = np.zeros(len(items), dtype=bool)
        needed[order[first:]] = True
        texts, position = {}, first

        def ready() -> Iterator[int]:
            nonlocal position
            while position < len(order) and order[position] in texts:
                position += 1
                yield order[position - 1]

        def flush(final: bool = False):
            while True:
                batch = list(itertools.islice(ready(), ENCODE_BATCH)) if final or len(texts) >= ENCODE_BATCH else []
                if not batch:
                    return
                for q, ids in zip(batch, self._encode([texts.pop(q) for q in batch])):
                    yield items[q], ids

        q = 0
        for shard in dict.fromkeys(items[:, 0].tolist()):
            rows = np.nonzero(items[:, 0] == shard)[0]
            docs = set(items[rows, 1].tolist())
            first_doc = int(items[rows[0], 1])
            reader = itertools.islice(self.plan.index.split.documents(shard, Counter()), first_doc, None)
            for doc, text in enumerate(reader, first_doc):
                if doc > items[rows[-1], 1]:
                    break
                if doc in docs:
                    if needed[q]:
                        texts[q] = text
                    q += 1
                    yield from flush()
            if q != rows[-1] + 1:
                raise StreamError(f"{self.plan.index.split.shard_name(shard)} holds fewer documents than when "
                                  f"it was indexed; the file changed (remove data.stream_cache to index it again)")
        yield from flush(final=True)

    def _windows(self, step: int) -> Iterator[np.ndarray]:
        plan, T = self.plan, self.T
        pass_, w = divmod(step, plan.windows)
        while True:
            items = plan.lane_items(self.k, pass_)
            order = plan.lane_order(self.k, pass_, len(items))
            if plan.mode == "paper":
                for _, ids in self._documents(items, order, w):
                    yield _padded(ids, T)
            else:
                yield from self._packed(items, order, w)
            pass_, w = pass_ + 1, 0

    def _packed(self, items: np.ndarray, order: np.ndarray, w: int) -> Iterator[np.ndarray]:
        lengths = (items[order, 3] - items[order, 2])
        ends = np.cumsum(lengths)
        first = int(np.searchsorted(ends, w * self.T, side="right"))
        offset = w * self.T - int(ends[first] - lengths[first])
        T, buffer, windows_left = self.T, np.empty(0, dtype=np.int32), self.plan.windows - w
        for row, ids in self._documents(items, order, first):
            tokens = np.asarray(ids + [self.tok.eos_id], dtype=np.int32)
            if len(tokens) != row[4]:
                raise StreamError(f"{self.plan.index.split.shard_name(int(row[0]))}: document {row[1]} tokenises "
                                  f"differently than when it was indexed (remove data.stream_cache)")
            buffer = np.concatenate([buffer, tokens[row[2]: row[3]][offset:]])
            offset = 0
            while len(buffer) >= T + 1 and windows_left:
                yield buffer[: T + 1]
                buffer, windows_left = buffer[T:], windows_left - 1
            if not windows_left:
                return

    def next_window(self) -> np.ndarray:
        return next(self.windows)


class RankStream(torch.utils.data.IterableDataset):
    """One item per (step, loader worker): the windows of the worker's share of this rank's lanes.
    Worker w of n owns lanes[w::n]; a DataLoader hands items out worker by worker, so the rank gets
    each step's shares in order."""

    def __init__(self, plans: list[SourcePlan], tokenizer: str, lanes: list[int], first_step: int):
        self.plans, self.tokenizer, self.lanes, self.first_step = plans, tokenizer, lanes, first_step

    def __iter__(self):
        from .tokenizer import load_tokenizer
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        tok, skipped = load_tokenizer(self.tokenizer), Counter()
        lanes = [Lane(*lane_of(self.plans, j), tok, self.first_step, skipped) for j in self.lanes[worker::workers]]
        for step in itertools.count(self.first_step):
            try:
                windows = np.stack([lane.next_window() for lane in lanes])
            except StreamError as e:
                yield {"step": step, "error": str(e)}
                return
            yield {"step": step, "windows": windows}


def lane_of(plans: list[SourcePlan], j: int) -> tuple[SourcePlan, int]:
    """The plan of global lane j and j's place among its lanes."""
    for plan in plans:
        if j in plan.lanes:
            return plan, plan.lanes.index(j)
    raise KeyError(j)


def lanes_by_weight(weights: list[float], lanes: int) -> list[list[int]]:
    """Each source's lanes: counts in proportion to the weights (largest remainders, at least one
    each), interleaved so that every stretch of lanes (a rank's) holds the sources in proportion."""
    if lanes < len(weights):
        raise StreamError(f"{len(weights)} data.sources need at least as many sequences per step, not {lanes}")
    share = np.asarray(weights, dtype=np.float64) / sum(weights)
    counts = np.maximum(np.floor(share * lanes).astype(int), 1)
    while counts.sum() > lanes:
        counts[np.argmax(counts)] -= 1
    for i in np.argsort(-(share * lanes - counts), kind="stable")[: lanes - counts.sum()]:
        counts[i] += 1
    result, given = [[] for _ in weights], np.zeros(len(weights))
    for j in range(lanes):
        s = int(np.argmax(counts * (j + 1) / lanes - given - (given >= counts) * lanes))
        result[s].append(j)
        given[s] += 1
    return result


def _as_is(item):
    return item


def to_batch(windows: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) int64 of windows, as data.Sequences gives them: a position whose target is
    past the end of its document holds the pad id and the target IGNORE."""
    w = torch.from_numpy(windows.astype(np.int64))
    scored = w[:, 1:] >= 0
    return torch.where(scored, w[:, :-1], pad_id), torch.where(scored, w[:, 1:], data.IGNORE)


def _step_positions(epoch: int):
    return lambda positions: positions


class StreamLoader:
    """This rank's micro-batches (inputs, targets) from the stream, as data.TrainLoader gives them:
    step s is global sequences [s G, (s+1) G), rank r the r-th contiguous share, in micro-batches.
    Its position is data.cursor's GlobalBatchCursor, whose epoch is a pass of the stream (the
    steps until the first source's pass ends): a lane's place follows from the step alone."""

    def __init__(self, plans: list[SourcePlan], tokenizer: str, tokenizer_hash: str, pad_id: int, seq_len: int,
                 mode: str, global_batch: int, micro_batch: int, rank: int = 0, world_size: int = 1,
                 workers: int = 0, seed: int = 0, repeat: bool = True):
        self.plans, self.tokenizer, self.tokenizer_hash, self.pad_id = plans, tokenizer, tokenizer_hash, pad_id
        self.seq_len, self.mode, self.global_batch, self.micro_batch = seq_len, mode, global_batch, micro_batch
        self.rank, self.world_size = rank, world_size
        self.steps_per_pass = min(plan.windows for plan in plans)
        self.cursor = GlobalBatchCursor(self.steps_per_pass * global_batch, global_batch, micro_batch, rank,
                                        world_size, seed, _step_positions, "stream-lanes", repeat,
                                        unit="sequence", data="streamed data")
        self.per_rank = self.cursor.per_rank
        self.lanes = list(range(rank * self.per_rank, (rank + 1) * self.per_rank))
        self.workers = min(workers, self.per_rank)
        self._items, self._windows = None, None

    @property
    def steps_per_epoch(self) -> int:
        return self.steps_per_pass

    @property
    def global_step(self) -> int:
        return self.cursor.epoch * self.steps_per_pass + self.cursor.step

    def __iter__(self):
        return self

    def _start(self) -> None:
        stream = RankStream(self.plans, self.tokenizer, self.lanes, self.global_step)
        if not self.workers:
            self._items = iter(stream)
            return
        # its own generator: a DataLoader draws worker seeds from the global RNG otherwise
        self._items = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.workers,
                                                       collate_fn=_as_is, prefetch_factor=4,
                                                       generator=torch.Generator()))

    def _fetch_step(self) -> None:
        """This rank's windows of the current step."""
        n = max(1, self.workers)
        windows = np.empty((self.per_rank, self.seq_len + 1), dtype=np.int32)
        for worker in range(n):
            item = next(self._items)
            if "error" in item:
                raise StreamError(item["error"])
            assert item["step"] == self.global_step, (item["step"], self.global_step)
            windows[worker::n] = item["windows"]
        self._windows = windows

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.cursor.start_epoch_if_due()
        if self._items is None:
            self._start()
        if self._windows is None:
            self._fetch_step()
        first = self.cursor.micro * self.micro_batch
        batch = to_batch(self._windows[first: first + self.micro_batch], self.pad_id)
        self.cursor.next_ids()
        if self.cursor.micro == 0:
            self._windows = None
        return batch

    def close(self) -> None:
        """Stops the loader workers (they are restarted by the next next())."""
        self._items, self._windows = None, None

    def source_sequences(self) -> dict:
        """Sequences trained on from each source (all ranks, whole steps): its lanes times the steps."""
        return {plan.name: self.global_step * len(plan.lanes) for plan in self.plans}

    def damage(self) -> Counter:
        return sum((plan.index.skipped for plan in self.plans), Counter())

    def state_dict(self) -> dict:
        return {"stream": STATE_FORMAT, **self.cursor.state_dict(), "plans": [p.describe() for p in self.plans],
                "tokenizer": self.tokenizer_hash, "mode": self.mode, "seq_len": self.seq_len,
                "skipped": dict(self.damage()), "source_sequences": self.source_sequences()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("stream") != STATE_FORMAT:
            older = state.get("stream") == 1
            raise ValueError("the loader state is " + ("an older streamed loader's (one cursor per lane); it cannot "
                                                       "be continued exactly by this version" if older else
                                                       "not a streamed run's (data.source stream); resume it with "
                                                       "the data source it was saved with"))
        if (state["mode"], state["seq_len"]) != (self.mode, self.seq_len) or state["tokenizer"] != self.tokenizer_hash:
            raise ValueError("the loader state was saved with another data.mode, data.seq_len or tokenizer")
        now = json.loads(json.dumps([p.describe() for p in self.plans]))
        if state["plans"] != now:
            raise ValueError(f"the loader state belongs to another stream (sources, shards, data.seed or "
                             f"data.shuffle_buffer differ): saved {state['plans']}, now {now}")
        self.cursor.load_state_dict(state)
        self.close()


# --- validation ------------------------------------------------------------------------------------

def validation_windows_from(split, tok, seq_len: int, mode: str) -> Iterator[tuple[np.ndarray, int]]:
    """(window, scored tokens) of the validation split in order: data.Sequences' sequences of it."""
    skipped, T = Counter(), seq_len
    documents = (text for shard in range(split.n_shards) for text in split.documents(shard, skipped))
    buffer = np.empty(0, dtype=np.int32)
    while batch := list(itertools.islice(documents, ENCODE_BATCH)):
        encoded = [t for t in encode_documents(tok, batch, skipped, T + 1 if mode == "paper" else 0) if t is not None]
        if mode == "paper":
            for tokens in encoded:
                window = np.full(T + 1, -1, dtype=np.int32)
                window[: min(len(tokens), T + 1)] = tokens[: T + 1]
                yield window, min(len(tokens) - 1, T)
            continue
        buffer = np.concatenate([buffer, *encoded])
        start = 0
        while len(buffer) - start >= T + 1:
            yield buffer[start: start + T + 1].copy(), T
            start += T
        buffer = buffer[start:]


def take_windows(windows: Iterator[tuple[np.ndarray, int]], n_tokens: int) -> tuple[list[np.ndarray], int]:
    """The next windows holding n_tokens scored tokens (fewer if the split ends), as
    data.validation_sequence_ids counts them."""
    taken, scored = [], 0
    while scored < n_tokens:
        item = next(windows, None)
        if item is None:
            break
        taken.append(item[0])
        scored += item[1]
    return taken, scored


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _cached_array(path: Path, compute) -> np.ndarray:
    """np.load(path), or compute() saved there first (atomically: concurrent writers are harmless).
    A cache file that cannot be read (empty, cut short) is named in one line and computed again."""
    if path.is_file():
        try:
            return np.load(path)
        except Exception as e:  # zero bytes: EOFError; cut short: ValueError, OSError
            print(f"warning: {path}: unreadable cache file ({type(e).__name__}); read again", file=sys.stderr)
    array = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)
    return array


def parse_sources(entries: list[str]) -> list[tuple[str, float]]:
    """data.sources entries PATH=WEIGHT (a weight alone-less entry weighs 1) -> [(path, weight)]."""
    sources = []
    for entry in entries:
        path, _, weight = entry.rpartition("=") if "=" in entry else (entry, "", "1")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not path or not value > 0:
            raise StreamError(f"data.sources entry {entry!r}: write PATH=WEIGHT with a weight > 0")
        sources.append((path, value))
    return sources


class Stream:
    """A streamed source as the trainer uses it: the tokenizer, the train loader, the validation and
    selection batches, the unigram baseline."""

    def __init__(self, data_cfg, rank: int = 0, world_size: int = 1):
        from .tokenizer import load_tokenizer
        if not data_cfg.raw:
            raise StreamError("data.source stream reads data.raw, which is not set")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork: one thread each
        self.cfg, self.rank, self.world_size = data_cfg, rank, world_size
        self.tok = load_tokenizer(data_cfg.tokenizer)
        self.pad_id = max(self.tok.pad_id, 0)
        train_name, val_name = (list(data_cfg.hub_splits) + ["train", "validation"])[:2]
        self._train_name = train_name
        self.train = open_split(data_cfg.raw, "train", train_name)
        self._validation, self._validation_name = None, val_name

    @property
    def validation(self):
        if self._validation is None:
            self._validation = open_split(self.cfg.raw, "validation", self._validation_name, shared=False)  # rank 0
        return self._validation

    def model_vocab_size(self, configured: int) -> int:
        return data.model_vocab_size({"tokenizer": self.tok.describe()}, configured)

    def train_loader(self, global_batch: int, micro_batch: int, allow_repetition: bool) -> StreamLoader:
        """One plan per source (data.sources, else data.raw alone), their lanes dealt by weight."""
        cfg = self.cfg
        sources = parse_sources(cfg.sources) if cfg.sources else [(cfg.raw, 1.0)]
        splits = [self.train] if not cfg.sources else [open_split(path, "train", self._train_name)
                                                       for path, _ in sources]
        lanes = lanes_by_weight([w for _, w in sources], global_batch)
        counter = self.tok if cfg.mode == "packed" else None
        plans = [SourcePlan(path, Index(split, counter, Path(cfg.stream_cache), workers=cfg.loader_workers), mine,
                            cfg.seed, key, cfg.mode, cfg.seq_len, cfg.shuffle_buffer)
                 for key, ((path, _), split, mine) in enumerate(zip(sources, splits, lanes))]
        return StreamLoader(plans, cfg.tokenizer, self.tok.hash, self.pad_id, cfg.seq_len, cfg.mode, global_batch,
                            micro_batch, self.rank, self.world_size, cfg.loader_workers, cfg.seed, allow_repetition)

    def cache_path(self, kind: str, key: dict) -> Path:
        return Path(self.cfg.stream_cache) / f"{kind}-{_digest(key)}.npy"

    def validation_windows(self, n_tokens: int, after_tokens: int = 0) -> np.ndarray:
        """The fixed validation windows (or, with after_tokens, the selection slice after them), from
        the cache when it has them."""
        key = {"source": self.validation.fingerprint, "tokenizer": self.tok.hash, "mode": self.cfg.mode,
               "seq_len": self.cfg.seq_len, "tokens": n_tokens, "after": after_tokens}

        def read() -> np.ndarray:
            windows = validation_windows_from(self.validation, self.tok, self.cfg.seq_len, self.cfg.mode)
            take_windows(windows, after_tokens)
            taken, scored = take_windows(windows, n_tokens)
            if after_tokens and scored < n_tokens:
                raise ValueError(f"the validation split holds only {scored:,} scored tokens after the first "
                                 f"{after_tokens:,} (reported) ones, fewer than train.select_tokens {n_tokens:,}")
            return np.stack(taken) if taken else np.empty((0, self.cfg.seq_len + 1), dtype=np.int32)

        windows = _cached_array(self.cache_path("validation", key), read)
        scored = int((windows[:, 1:] >= 0).sum())
        if scored < n_tokens and not after_tokens and self.rank == 0:
            print(f"warning: the validation split of {self.cfg.raw} holds only {scored:,} scored tokens, fewer than "
                  f"the {n_tokens:,} asked for; validation uses them all", file=sys.stderr)
        return windows

    def validation_batches(self, micro_batch: int, n_tokens: int, after_tokens: int = 0) -> list:
        """This rank's share of the validation windows, as data.validation_batches shares them out
        (round-robin; every rank as many batches as rank 0, each of micro_batch rows, filled up with fully
        masked ones: a compiled model sees one shape). Rank 0 reads them and broadcasts them (a
        collective; without a process group each reads them)."""
        result = None
        if self.rank == 0 or not is_distributed():
            try:
                result = self.validation_windows(n_tokens, after_tokens)
            except ValueError as e:
                result = e
        result = broadcast_object(result)
        if isinstance(result, ValueError):
            raise result
        mine = result[self.rank::self.world_size]
        batches = [to_batch(mine[i: i + micro_batch], self.pad_id) for i in range(0, len(mine), micro_batch)]
        most = math.ceil(len(result[0::self.world_size]) / micro_batch)
        return data.filled_batches(batches, micro_batch, self.cfg.seq_len, self.pad_id, most)

    def unigram_counts(self, max_train_tokens: int) -> np.ndarray:
        """Token counts over the first max_train_tokens tokens of the train split, shards in order."""
        key = {"source": self.train.fingerprint, "tokenizer": self.tok.hash, "tokens": max_train_tokens}

        def count() -> np.ndarray:
            counts, seen, skipped = np.zeros(self.tok.vocab_size, dtype=np.int64), 0, Counter()
            documents = (t for shard in range(self.train.n_shards) for t in self.train.documents(shard, skipped))
            while seen < max_train_tokens and (batch := list(itertools.islice(documents, ENCODE_BATCH))):
                for tokens in encode_documents(self.tok, batch, skipped):
                    if tokens is not None and seen < max_train_tokens:
                        tokens = tokens[: max_train_tokens - seen]
                        counts += np.bincount(tokens, minlength=self.tok.vocab_size)[: self.tok.vocab_size]
                        seen += len(tokens)
            return counts

        return _cached_array(self.cache_path("unigram", key), count)

    def unigram_perplexity(self, n_tokens: int, after_tokens: int = 0, max_train_tokens: int = UNIGRAM_TOKENS) -> float:
        """data.unigram_perplexity on the stream: the perplexity on the validation windows of a
        context-free model (add-one smoothed token frequencies of the train split's first
        max_train_tokens tokens)."""
        counts = self.unigram_counts(max_train_tokens).astype(np.float64)
        log_prob = np.log((counts + 1.0) / (counts.sum() + len(counts)))
        targets = self.validation_windows(n_tokens, after_tokens)[:, 1:]
        targets = targets[targets >= 0]
        return math.exp(-float(log_prob[targets].sum()) / max(len(targets), 1))
