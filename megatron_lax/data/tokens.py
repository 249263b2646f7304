"""Training and validation data from prepared shards (see data/prepare.py), memory-mapped.

Two ways to cut documents into sequences of `seq_len` inputs (+1 token for the shifted targets):
- packed: the split is one token stream (documents joined by EOS), cut every seq_len tokens; each
  token is a target exactly once and nothing is padded.
- paper: one document per sequence, truncated and padded; padding is not scored (targets -100).
  This is the GaLore/CoLA protocol, so perplexities compare with the paper's tables.

Sequence order is a seeded pseudo-random permutation per epoch, computed per position (no array of
the epoch's order is ever built). Optimizer step s uses the global positions [s*G, (s+1)*G) of it;
rank r takes the r-th contiguous slice of G / world_size, in micro-batches. So the data of a step
does not depend on how many ranks share it, and the loader's state is just (epoch, step,
micro-batch): resume is exact, even onto a different number of ranks at a step boundary.

Memory per rank does not grow with the number of documents: tokens and document offsets stay in
memory-mapped files, and only a few numbers per shard are held in RAM.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
import re
import resource
from pathlib import Path

import numpy as np
import torch

from .. import paper
from .cursor import DataExhausted, GlobalBatchCursor  # noqa: F401 (DataExhausted: raised from here)

IGNORE = -100


# --- preparation and the manifest ------------------------------------------------------------------

def read_manifest(path) -> dict:
    manifest_path = Path(path) / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{path}: no manifest.json; prepare the data with `python -m data_prep.prepare`")
    try:
        return json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{manifest_path}: malformed JSON ({e})") from None


def ensure_prepared(data_cfg) -> Path:
    """Prepares data_cfg.raw into data_cfg.path with data_cfg.tokenizer unless it is already there,
    and refuses prepared data that another tokenizer wrote."""
    path = Path(data_cfg.path)
    if not (path / "manifest.json").is_file():
        with preparing(path):  # a run started beside this one waits here, then reads what the first one wrote
            if not (path / "manifest.json").is_file():
                return prepare_from_raw(data_cfg, path)
    check_tokenizer(read_manifest(path), data_cfg.tokenizer, path)
    return path


@contextlib.contextmanager
def preparing(path: Path):
    """Holds an exclusive lock on the prepared folder's parent while `path` is prepared (a lock on the
    directory itself, so no lock file is left behind); released when the process ends, however it ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def prepare_from_raw(data_cfg, path: Path) -> Path:
    if not data_cfg.raw:
        raise FileNotFoundError(f"data.path {path} holds no prepared data and data.raw is not set")
    default = type(data_cfg)()
    if data_cfg.raw == default.raw and path != Path(default.path):
        raise FileNotFoundError(f"data.path {path} holds no prepared data; to prepare it, set data.raw to the raw "
                                f"text (data.raw is the default {default.raw}, the shipped sample corpus, which is "
                                f"prepared only into the default data.path {default.path})")
    from .prepare import expand_inputs, prepare
    inputs = expand_inputs(data_cfg.raw)
    if not inputs:
        raise FileNotFoundError(f"data.raw {data_cfg.raw}: no input files found")
    prepare(inputs, data_cfg.tokenizer, path, data_cfg.workers, progress=False)
    return path


def check_tokenizer(manifest: dict, tokenizer_spec: str, path) -> None:
    """Token ids mean nothing under another tokenizer: compare content hashes, not names."""
    from .tokenizer import load_tokenizer
    prepared, wanted = manifest["tokenizer"], load_tokenizer(tokenizer_spec)
    if prepared["hash"] != wanted.hash:
        raise ValueError(f"{path} was prepared with tokenizer {prepared['name']} (hash {prepared['hash']}) but "
                         f"data.tokenizer is {tokenizer_spec} (hash {wanted.hash}); set data.tokenizer to the "
                         f"tokenizer the data was prepared with, or prepare it again")


def model_vocab_size(manifest: dict, configured: int) -> int:
    """The model's vocabulary: as configured (which must hold the tokenizer), or the tokenizer's
    size rounded up to a multiple of 64."""
    tokenizer_vocab = manifest["tokenizer"]["vocab_size"]
    if configured <= 0:
        return 64 * math.ceil(tokenizer_vocab / 64)
    if tokenizer_vocab > configured:
        raise ValueError(f"the tokenizer has {tokenizer_vocab} entries but model.vocab_size is {configured}; "
                         f"set model.vocab_size >= {tokenizer_vocab} (or 0 to follow the tokenizer)")
    return configured


# --- reading a split ---------------------------------------------------------------------------------

def _map_tokens(paths: list[str], dtype: str, shard: int) -> np.ndarray:
    # a plain ndarray view slices several times faster than an np.memmap, and keeps the map open
    return np.asarray(np.memmap(paths[shard], dtype=dtype, mode="r"))


def _map_offsets(paths: list[str], shard: int) -> np.ndarray:
    return np.asarray(np.load(paths[shard], mmap_mode="r"))


def shards_kept_mapped(n_shards: int) -> int:
    """Every shard stays mapped when the open-file limit allows (a map holds a file descriptor, and a
    shard has two files); else the most recently used that fit in a quarter of the limit. Remapping
    a shard costs ~0.1 ms, too much to do for every sequence."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return n_shards if soft == resource.RLIM_INFINITY else max(8, min(n_shards, soft // 8))


def _shard_size(directory: Path, name: str, itemsize: int) -> tuple[int, int]:
    """(tokens, documents) of one prepared shard, its two files checked against each other without
    reading them."""
    bin_path, idx_path = directory / f"{name}.bin", directory / f"{name}.idx.npy"
    try:
        size = bin_path.stat().st_size
        offsets = np.load(idx_path, mmap_mode="r")
        documents, end = len(offsets) - 1, int(offsets[-1])
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e.filename}: missing; the prepared data is incomplete (run data_prep.prepare "
                                f"again)") from None
    except (ValueError, OSError, IndexError, TypeError) as e:
        raise ValueError(f"{idx_path}: not a document index ({e}); delete the shard and run data_prep.prepare "
                         f"again") from None
    if size % itemsize or end != size // itemsize:
        raise ValueError(f"{bin_path}: {size} bytes, but its index ends at token {end}; the shard is damaged "
                         f"(delete it and run data_prep.prepare again)")
    return size // itemsize, documents


class Split:
    """The shards of one split as one token stream of documents. RAM holds only where each shard
    starts (in tokens and in documents); shards without tokens are left out."""

    def __init__(self, path, split: str):
        manifest = read_manifest(path)
        if split not in manifest["splits"]:
            raise ValueError(f"{path}: the prepared data has no {split} split")
        dtype = np.dtype(manifest["dtype"])
        self.eos_id, self.pad_id = manifest["tokenizer"]["eos_id"], max(manifest["tokenizer"]["pad_id"], 0)
        directory, token_paths, offset_paths, tokens, documents = Path(path) / split, [], [], [0], [0]
        for name in manifest["splits"][split]["shards"]:
            n_tokens, n_documents = _shard_size(directory, name, dtype.itemsize)
            if n_tokens:
                token_paths.append(str(directory / f"{name}.bin"))
                offset_paths.append(str(directory / f"{name}.idx.npy"))
                tokens.append(n_tokens)
                documents.append(n_documents)
        self.token_starts = np.cumsum(tokens, dtype=np.int64)
        self.document_starts = np.cumsum(documents, dtype=np.int64)
        self.n_tokens, self.n_documents = int(self.token_starts[-1]), int(self.document_starts[-1])
        cached = functools.lru_cache(maxsize=shards_kept_mapped(len(token_paths)))
        self._tokens_of = cached(functools.partial(_map_tokens, token_paths, dtype.name))
        self._offsets_of = cached(functools.partial(_map_offsets, offset_paths))

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the stream, across shard boundaries."""
        pieces = []
        i = int(np.searchsorted(self.token_starts, start, side="right")) - 1
        while start < end:
            shard_start, shard = int(self.token_starts[i]), self._tokens_of(i)
            take = min(end, shard_start + len(shard)) - start
            pieces.append(shard[start - shard_start: start - shard_start + take])
            start += take
            i += 1
        return np.concatenate(pieces).astype(np.int64) if len(pieces) > 1 else pieces[0].astype(np.int64)

    def _document_span(self, doc: int) -> tuple[int, int, int]:
        """(shard, first token, end token) of a document, within its shard: documents never cross shards."""
        shard = int(np.searchsorted(self.document_starts, doc, side="right")) - 1
        offsets = self._offsets_of(shard)
        local = doc - int(self.document_starts[shard])
        return shard, int(offsets[local]), int(offsets[local + 1])

    def document(self, doc: int, max_tokens: int) -> np.ndarray:
        """The first max_tokens tokens of document `doc` (EOS included)."""
        shard, start, end = self._document_span(doc)
        return self._tokens_of(shard)[start: min(end, start + max_tokens)].astype(np.int64)

    def document_length(self, doc: int) -> int:
        _, start, end = self._document_span(doc)
        return end - start


class Sequences:
    """Indexable sequences of one split in one mode; item i -> (inputs, targets) int64 arrays.
    In paper mode item i is document i; one without a scored target (just EOS, which
    data_prep.prepare no longer writes) is a fully masked sequence."""

    def __init__(self, split: Split, seq_len: int, mode: str):
        self.split, self.seq_len, self.mode = split, seq_len, mode
        self.count = max(0, (split.n_tokens - 1) // seq_len) if mode == "packed" else split.n_documents

    def __len__(self):
        return self.count

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        T = self.seq_len
        if self.mode == "packed":
            window = self.split.tokens(i * T, i * T + T + 1)
            return window[:-1], window[1:]
        window = self.split.document(i, T + 1)
        inputs = np.full(T, self.split.pad_id, dtype=np.int64)
        targets = np.full(T, IGNORE, dtype=np.int64)
        inputs[: len(window) - 1], targets[: len(window) - 1] = window[:-1], window[1:]
        return inputs, targets

    def scored_tokens(self, i: int) -> int:
        if self.mode == "packed":
            return self.seq_len
        return min(self.split.document_length(i) - 1, self.seq_len)


def _stack(sequences: Sequences, indices) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [sequences[int(i)] for i in indices]
    return (torch.from_numpy(np.stack([p[0] for p in pairs])), torch.from_numpy(np.stack([p[1] for p in pairs])))


# --- the order of an epoch -------------------------------------------------------------------------

MASK64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """SplitMix64's output function on a Python int: well-spread 64-bit keys from small seeds."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


class Permutation:
    """A seeded pseudo-random permutation of range(n), evaluated per position in O(1) memory.

    A Feistel network on the b bits of n - 1 (the two halves of floor(b/2) and ceil(b/2) bits swap
    widths every round; an even number of rounds restores them) is a bijection of [0, 2^b) whatever
    its round function. A position it sends to n or beyond is sent again (cycle walking) until it
    lands below n, which makes it a bijection of range(n); 2^b < 2n, so that takes fewer than two
    tries on average. All arithmetic is on uint64, so the order is the same everywhere."""

    ROUNDS = 6  # even
    FMIX = (np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53))  # MurmurHash3's finaliser

    def __init__(self, n: int, *key: int):
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.widths = (bits // 2, bits - bits // 2)  # of the high and the low part
        state = 0
        for k in key:
            state = mix64(state ^ (k & MASK64))
        self.round_keys = [np.uint64(mix64(state + r)) for r in range(self.ROUNDS)]

    def _round(self, half: np.ndarray, key: np.uint64, width: int) -> np.ndarray:
        shift = np.uint64(33)
        x = half ^ key
        x ^= x >> shift
        x *= self.FMIX[0]
        x ^= x >> shift
        x *= self.FMIX[1]
        x ^= x >> shift
        return x & np.uint64((1 << width) - 1)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        high, low = self.widths
        left, right = x >> np.uint64(low), x & np.uint64((1 << low) - 1)
        for key in self.round_keys:  # (left: high bits, right: low bits) -> (right, left ^ F(right))
            left, right = right, left ^ self._round(right, key, high)
            high, low = low, high
        return (left << np.uint64(low)) | right

    def __call__(self, positions) -> np.ndarray:
        """The sequence ids at these positions of the order (int64)."""
        positions = np.atleast_1d(np.asarray(positions, dtype=np.int64))
        if positions.size and (positions.min() < 0 or positions.max() >= self.n):
            raise IndexError(f"positions must lie in [0, {self.n})")
        ids = self._feistel(positions.astype(np.uint64))
        outside = ids >= np.uint64(self.n)
        while outside.any():
            ids[outside] = self._feistel(ids[outside])
            outside = ids >= np.uint64(self.n)
        return ids.astype(np.int64)


# --- training ------------------------------------------------------------------------------------------

class TrainLoader:
    """An endless iterator of this rank's micro-batches (inputs, targets), resumable exactly."""

    ORDER = "feistel-6"  # saved with the state: a state from another ordering cannot continue exactly

    def __init__(self, path, seq_len: int, mode: str, global_batch: int, micro_batch: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, allow_repetition: bool = False):
        self.sequences = Sequences(Split(path, "train"), seq_len, mode)
        n = len(self.sequences)
        self.cursor = GlobalBatchCursor(n, global_batch, micro_batch, rank, world_size, seed,
                                        lambda epoch: Permutation(n, seed, epoch), self.ORDER, allow_repetition,
                                        unit="sequence", legacy_order="a full permutation in memory")
        self.global_batch, self.steps_per_epoch = global_batch, self.cursor.steps_per_epoch

    @property
    def total_tokens(self) -> int:
        """Tokens the train split offers per epoch (what a token budget is checked against)."""
        return self.sequences.split.n_tokens

    @property
    def sequences_per_epoch(self) -> int:
        return self.cursor.samples_per_epoch

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _stack(self.sequences, self.cursor.next_ids())

    def state_dict(self) -> dict:
        return self.cursor.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.cursor.load_state_dict(state)


# --- validation ------------------------------------------------------------------------------------

def validation_sequence_ids(sequences: Sequences, n_tokens: int, after_tokens: int = 0) -> list[int]:
    """The first sequences of the validation split holding n_tokens scored tokens (at least one).
    after_tokens > 0: the sequences that follow the first after_tokens' worth instead (the selection
    slice, disjoint from the reported ones); an error if the split runs out before n_tokens."""
    skip = len(validation_sequence_ids(sequences, after_tokens)) if after_tokens else 0
    ids, scored = [], 0
    for i in range(skip, len(sequences)):
        if scored >= n_tokens:
            break
        ids.append(i)
        scored += sequences.scored_tokens(i)
    if after_tokens and scored < n_tokens:
        raise ValueError(f"the validation split holds only {scored:,} scored tokens after the first "
                         f"{after_tokens:,} (reported) ones, fewer than train.select_tokens {n_tokens:,}")
    return ids


def validation_batches(path, seq_len: int, micro_batch: int, n_tokens: int, mode: str, rank: int = 0,
                       world_size: int = 1, after_tokens: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share (round-robin) of the fixed validation set: the same sequences for every
    run, batch size and number of ranks. Every rank gets as many batches as rank 0: sharded engines
    (FSDP2, ZeRO-3) gather parameters inside each forward, so a rank with one batch fewer would leave
    the others waiting forever. The extra batches are fully masked (pad inputs, no scored target),
    so they add nothing to the NLL or the token count. A short last batch is filled up the same way:
    every batch has micro_batch rows, so a compiled model sees one shape (no recompile)."""
    sequences = Sequences(Split(path, "validation"), seq_len, mode)
    ids = validation_sequence_ids(sequences, n_tokens, after_tokens)
    mine = ids[rank::world_size]
    batches = [_stack(sequences, mine[i: i + micro_batch]) for i in range(0, len(mine), micro_batch)]
    most = math.ceil(len(ids[0::world_size]) / micro_batch)
    return filled_batches(batches, micro_batch, seq_len, sequences.split.pad_id, most)


def filled_batches(batches: list, micro_batch: int, seq_len: int, pad_id: int, most: int) -> list:
    """`batches` with each filled up to micro_batch rows, then more up to `most` batches, with fully
    masked rows (pad inputs, no scored target): they add nothing to the NLL or the token count."""
    padding = (torch.full((micro_batch, seq_len), pad_id, dtype=torch.int64),
               torch.full((micro_batch, seq_len), IGNORE, dtype=torch.int64))
    filled = [tuple(torch.cat([part, pad[len(part):]]) for part, pad in zip(batch, padding)) for batch in batches]
    return filled + [padding] * (most - len(filled))


# --- token budget ----------------------------------------------------------------------------------

def parse_token_count(text: str) -> float:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e\+?[0-9]+)?)\s*([kmbt]?)\s*", str(text).lower())
    if not match:
        raise ValueError(f"train.token_budget {text!r} is not paper, chinchilla or a number such as 500M or 2B")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2)]
    return float(match.group(1)) * scale


def budget_tokens(budget: str, model_cfg, n_params: int) -> float:
    """Tokens for train.token_budget, or 0 when the budget is not set (steps are given instead)."""
    if budget == "paper":
        if model_cfg.dim not in paper.STEPS_BY_DIM:
            raise ValueError(f"train.token_budget paper is defined for the 60M/130M/350M/1B shapes "
                             f"(dim 512/768/1024/2048), not dim {model_cfg.dim}")
        return float(paper.STEPS_BY_DIM[model_cfg.dim] * paper.TOKENS_PER_STEP)
    if budget == "chinchilla":
        return 20.0 * n_params
    return parse_token_count(budget)


def planned_steps(train_cfg, model_cfg, seq_len: int, n_params: int) -> int:
    """Optimizer steps: from the token budget when one is set, else train.steps."""
    budget = budget_tokens(train_cfg.token_budget, model_cfg, n_params)
    steps = math.ceil(budget / (train_cfg.global_batch * seq_len)) if budget else train_cfg.steps
    if steps <= 0:
        raise ValueError("set train.steps or train.token_budget")
    return steps


def resolve_steps(train_cfg, model_cfg, seq_len: int, available_tokens: int, n_params: int) -> int:
    """planned_steps, refusing a run that needs more tokens than the prepared data holds unless
    repetition is allowed."""
    tokens_per_step = train_cfg.global_batch * seq_len
    steps = planned_steps(train_cfg, model_cfg, seq_len, n_params)
    needed = steps * tokens_per_step
    if needed > available_tokens and not train_cfg.allow_repetition:
        raise ValueError(f"the run needs {needed:,} tokens ({steps} steps of {tokens_per_step:,}) but the "
                         f"prepared data holds {available_tokens:,}; add data or set train.allow_repetition true")
    return steps


# --- the unigram baseline ---------------------------------------------------------------------------

def unigram_perplexity(path, seq_len: int, mode: str, n_tokens: int, max_train_tokens: int = 50_000_000,
                       after_tokens: int = 0) -> float:
    """The perplexity on the fixed validation set (or, with after_tokens, on the selection slice that
    follows it) of a model that ignores context: each token's frequency in (the first
    max_train_tokens of) the train split, add-one smoothed over the tokenizer's vocabulary. A trained
    model should end far below it."""
    train = Split(path, "train")
    vocab = read_manifest(path)["tokenizer"]["vocab_size"]
    counts = np.zeros(vocab, dtype=np.float64)
    end, chunk = min(train.n_tokens, max_train_tokens), 1 << 22
    for start in range(0, end, chunk):
        counts += np.bincount(train.tokens(start, min(end, start + chunk)), minlength=vocab)[:vocab]
    log_prob = np.log((counts + 1.0) / (counts.sum() + vocab))
    sequences = Sequences(Split(path, "validation"), seq_len, mode)
    nll, scored = 0.0, 0
    for i in validation_sequence_ids(sequences, n_tokens, after_tokens):
        targets = sequences[i][1]
        targets = targets[targets != IGNORE]
        nll -= float(log_prob[targets].sum())
        scored += len(targets)
    return math.exp(nll / max(scored, 1))
