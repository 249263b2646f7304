"""Pre-training straight from C4-layout shards, local or on the Hugging Face hub, with no preparation
pass: loader workers tokenise documents while training reads them (`data.source stream`).

    data.raw  DIR | GLOB | a comma-separated list of them       local .json.gz / .jsonl / .txt shards
              hf:OWNER/NAME[/CONFIG]                             a hub dataset, e.g. hf:allenai/c4/en

Lanes. A step of G sequences has G slots, and slot j of every step comes from lane j: a token stream
with a cursor of its own. The train split is cut into units (a shard, or a part of one when there are
fewer shards than lanes; see Plan) and lane j reads units j, j+G, ... of a seeded order of them, one
pass after another. A lane tokenises its documents and cuts them as data.Sequences does:
packed (documents joined by EOS, a window of seq_len + 1 tokens every seq_len tokens) or paper (one
document per sequence, truncated, padding not scored). Rank r owns lanes [r G/W, (r+1) G/W) and
splits them among its loader workers; no document is in two lanes, so no two ranks or workers read
the same document, and the data of a step does not depend on how many ranks share it. A stream has
no size to check a token budget against: the budget gives the steps, as with prepared shards, and a
lane that has read all its units ends the run (data.DataExhausted) unless train.allow_repetition,
when it starts another pass, in another seeded order.

Resume. A lane's cursor is (pass, unit, document, token offset) of its next sequence. At a checkpoint
every rank saves every lane's cursor (gathered from all ranks), so any number of ranks dividing G
continues the stream exactly at a step boundary; a restored lane re-reads its unit up to the document
without tokenising the ones before it.

Validation is the first sequences of the validation split holding the validation tokens (the rule of
data.validation_sequence_ids, so the same tokens as prepared shards of the same files give), read once
on rank 0, cached under data.stream_cache and broadcast: identical on every run and rank count.
"""
from __future__ import annotations

import collections
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
from .readers import is_text_file, iter_documents, split_of, usable_text

from . import tokens as data
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
STATE_FORMAT = 1


class StreamError(ValueError):
    """A streamed source that cannot be read; the message is one line."""


# --- where documents come from ---------------------------------------------------------------------

class LocalSplit:
    """The local files of one split, read with data/readers.py (bad records skipped and counted)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.n_shards = len(paths)
        self.fingerprint = [[p.name, p.stat().st_size] for p in paths]

    def documents(self, shard: int, skipped: Counter, part: tuple[int, int] = (0, 1)) -> Iterator[str]:
        """The documents of a shard, or of its part k of n: a contiguous range of its lines (JSON
        lines: only decompressed, not parsed, up to the range) or every n-th document (plain text)."""
        path = self.paths[shard]
        if is_text_file(path) and part != (0, 1):
            return itertools.islice(iter_documents(path, skipped, chunk_size=READ_CHUNK), part[0], None, part[1])
        return iter_documents(path, skipped, part=part, chunk_size=READ_CHUNK)


class HubSplit:
    """One split of a hub dataset, streamed by `datasets`; its shards are the dataset's files."""

    def __init__(self, spec: str, name: str, config: str | None, split: str):
        self.spec, self.split = spec, split
        try:
            from datasets import load_dataset
        except ImportError:
            raise StreamError(f"{spec}: streaming from the hub needs `datasets` (pip install 'megatron-lax[stream]')") \
                from None
        try:
            with _quiet_hub():
                self.dataset = load_dataset(name, config, split=split, streaming=True)
        except Exception as e:  # offline, unknown name or split, network: many types
            raise StreamError(f"{spec}: cannot open split {split!r} on the Hugging Face hub ({type(e).__name__}: "
                              f"{_first_line(e)})") from None
        self.n_shards = getattr(self.dataset, "num_shards", None) or self.dataset.n_shards
        self.fingerprint = [name, config, split, self.n_shards]

    def documents(self, shard: int, skipped: Counter, part: tuple[int, int] = (0, 1)) -> Iterator[str]:
        """The documents of a shard, or every n-th of them from the k-th (part k of n)."""
        try:
            for row in itertools.islice(self.dataset.shard(self.n_shards, shard), part[0], None, part[1]):
                text = row.get("text")
                if usable_text(text, skipped):
                    yield text
        except Exception as e:
            raise StreamError(f"{self.spec}: reading shard {shard} of split {self.split!r} failed "
                              f"({type(e).__name__}: {_first_line(e)})") from None


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


def open_split(spec: str, split: str, hub_split: str):
    """The train or validation split of data.raw (hub datasets: under the name `hub_split`)."""
    hub = parse_hub_spec(spec)
    if hub:
        return HubSplit(spec, *hub, hub_split)
    paths = [p for p in expand_inputs(spec) if split_of(p) == split]
    if not paths:
        raise StreamError(f"data.raw {spec}: no {split} shards there (C4 names them c4-{split}.*.json.gz)")
    return LocalSplit(paths)


# --- lanes -----------------------------------------------------------------------------------------

class Plan:
    """How the train split is dealt to `lanes` lanes. With fewer shards than lanes each shard is cut
    into `parts` parts (LocalSplit.documents, HubSplit.documents); unit u is part u % parts of shard
    u // parts, and lane j reads units j, j + lanes, ... of pass p's seeded order of them. Lanes hold
    the same number of units when the unit count is a multiple of the lane count (C4's 1024 shards
    and a power-of-two batch); otherwise some hold one more, and without repetition the run ends
    when the first lane has read its units."""

    def __init__(self, split, lanes: int, seed: int, repeat: bool):
        self.split, self.lanes, self.seed, self.repeat = split, lanes, seed, repeat
        self.parts = max(1, math.ceil(lanes / split.n_shards))
        self.n_units = split.n_shards * self.parts

    def lane_units(self, lane: int, pass_: int) -> list[int]:
        order = data.Permutation(self.n_units, self.seed, pass_)
        return order(np.arange(lane, self.n_units, self.lanes)).tolist()

    def unit_documents(self, unit: int, skipped: Counter) -> Iterator[str]:
        shard, part = divmod(unit, self.parts)
        return self.split.documents(shard, skipped, (part, self.parts))

    def describe(self) -> dict:
        return {"source": self.split.fingerprint, "lanes": self.lanes, "parts": self.parts, "seed": self.seed}


class LaneExhausted(Exception):
    pass


def _prefix(text: str, limit: int) -> str:
    """The text up to the last space or newline before `limit` characters (all of it if shorter)."""
    if len(text) <= limit:
        return text
    cut = max(text.rfind(" ", 0, limit), text.rfind("\n", 0, limit))
    return text[:cut] if cut > 0 else text


def encode_documents(tok, texts: list[str], skipped: Counter, max_tokens: int = 0) -> list[np.ndarray | None]:
    """Each text's tokens followed by EOS (int32), None for one that tokenises to nothing (counted).
    With max_tokens, only the first max_tokens of each are returned, tokenised from a prefix of a
    long text: exactly the same tokens for tokenizers whose pieces never cross whitespace
    (SentencePiece's default, T5's, byte-level BPE's pre-tokenizer), and the prefix is only used
    when it reaches PREFIX_MARGIN tokens past the ones kept."""
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
            out.append(np.asarray((ids + [tok.eos_id])[: max_tokens or None], dtype=np.int32))
        else:
            skipped["no_tokens"] += 1
            out.append(None)
    return out


class Lane:
    """One lane's sequences, as windows of seq_len + 1 token ids (-1 past the end of a short paper-mode
    document), from `cursor` on."""

    def __init__(self, lane: int, plan: Plan, tok, seq_len: int, mode: str, cursor, skipped: Counter):
        self.lane, self.plan, self.tok, self.seq_len, self.mode = lane, plan, tok, seq_len, mode
        self.max_tokens = seq_len + 1 if mode == "paper" else 0
        self.skipped = skipped
        self.pending: collections.deque = collections.deque()  # ((pass, unit, doc), tokens) not yet used up
        self.offset = cursor[3]  # tokens of pending[0] already used
        self.next_position = tuple(cursor[:3])  # of the document after the last one read
        self.documents = self._documents(tuple(cursor[:3]))

    def _documents(self, start) -> Iterator[tuple[tuple, np.ndarray]]:
        pass_, unit, doc = start
        while True:
            units, found = self.plan.lane_units(self.lane, pass_), False
            for u in range(unit, len(units)):
                texts = itertools.islice(self.plan.unit_documents(units[u], self.skipped), doc, None)
                while batch := list(itertools.islice(texts, ENCODE_BATCH)):
                    for tokens in encode_documents(self.tok, batch, self.skipped, self.max_tokens):
                        if tokens is not None:
                            found = True
                            yield (pass_, u, doc), tokens
                        doc += 1
                doc = 0
            if not self.plan.repeat:
                return
            if not found and start == (pass_, 0, 0):
                raise StreamError(f"lane {self.lane} of the stream has no documents in a whole pass: its units "
                                  f"{units} of {self.plan.n_units} are empty")
            pass_, unit, start = pass_ + 1, 0, (pass_ + 1, 0, 0)

    def _read(self) -> tuple[tuple, np.ndarray]:
        item = next(self.documents, None)
        if item is None:
            raise LaneExhausted(self.lane)
        position, _ = item
        self.next_position = (position[0], position[1], position[2] + 1)
        return item

    def next_window(self) -> np.ndarray:
        T = self.seq_len
        if self.mode == "paper":
            tokens = self._read()[1][: T + 1]
            window = np.full(T + 1, -1, dtype=np.int32)
            window[: len(tokens)] = tokens
            return window
        pieces, need, i, start = [], T + 1, 0, self.offset
        while need:
            if i == len(self.pending):
                self.pending.append(self._read())
            piece = self.pending[i][1][start: start + need]
            pieces.append(piece)
            need, i, start = need - len(piece), i + 1, 0
        self.offset += T
        while self.offset >= len(self.pending[0][1]):  # a window's last token starts the next: never empties
            self.offset -= len(self.pending.popleft()[1])
        return np.concatenate(pieces)

    def cursor(self) -> list[int]:
        """(pass, unit, document, token offset) of the next window's first token."""
        if self.pending:
            return [*self.pending[0][0], self.offset]
        return [*self.next_position, self.offset]  # nothing read since the lane started from its cursor


class RankStream(torch.utils.data.IterableDataset):
    """One item per (step, loader worker): the windows of the worker's share of this rank's lanes and
    their cursors after it. Worker w of n owns lanes[w::n]; a DataLoader hands items out worker by
    worker, so the rank gets each step's shares in order."""

    def __init__(self, plan: Plan, tokenizer: str, lanes: list[int], cursors: dict, first_step: int, seq_len: int,
                 mode: str):
        self.plan, self.tokenizer, self.lanes, self.cursors = plan, tokenizer, lanes, cursors
        self.first_step, self.seq_len, self.mode = first_step, seq_len, mode

    def __iter__(self):
        from .tokenizer import load_tokenizer
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        tok, skipped = load_tokenizer(self.tokenizer), Counter()
        lanes = [Lane(j, self.plan, tok, self.seq_len, self.mode, self.cursors[j], skipped)
                 for j in self.lanes[worker::workers]]
        for step in itertools.count(self.first_step):
            try:
                windows = np.stack([lane.next_window() for lane in lanes])
            except LaneExhausted as e:
                yield {"step": step, "exhausted": e.args[0]}
                return
            except StreamError as e:
                yield {"step": step, "error": str(e)}
                return
            yield {"step": step, "windows": windows, "cursors": [lane.cursor() for lane in lanes],
                   "skipped": dict(skipped)}


def _as_is(item):
    return item


def to_batch(windows: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) int64 of windows, as data.Sequences gives them: a position whose target is
    past the end of its document holds the pad id and the target IGNORE."""
    w = torch.from_numpy(windows.astype(np.int64))
    scored = w[:, 1:] >= 0
    return torch.where(scored, w[:, :-1], pad_id), torch.where(scored, w[:, 1:], data.IGNORE)


class StreamLoader:
    """This rank's micro-batches (inputs, targets) from the stream, as data.TrainLoader gives them:
    step s is global sequences [s G, (s+1) G), rank r the r-th contiguous share, in micro-batches."""

    SKIP_REPORT_SECONDS = 60

    def __init__(self, plan: Plan, tokenizer: str, tokenizer_hash: str, pad_id: int, seq_len: int, mode: str,
                 global_batch: int, micro_batch: int, rank: int = 0, world_size: int = 1, workers: int = 0):
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"global batch {global_batch} is not a multiple of micro batch {micro_batch} "
                             f"x {world_size} ranks")
        if plan.lanes != global_batch:
            raise ValueError(f"the stream has {plan.lanes} lanes, not one per sequence of a step ({global_batch})")
        self.plan, self.tokenizer, self.tokenizer_hash, self.pad_id = plan, tokenizer, tokenizer_hash, pad_id
        self.seq_len, self.mode, self.global_batch, self.micro_batch = seq_len, mode, global_batch, micro_batch
        self.rank, self.world_size = rank, world_size
        self.per_rank = global_batch // world_size
        self.micro_per_step = self.per_rank // micro_batch
        self.lanes = list(range(rank * self.per_rank, (rank + 1) * self.per_rank))
        self.workers = min(workers, self.per_rank)
        self.step, self.micro = 0, 0
        self.cursors = {j: [0, 0, 0, 0] for j in self.lanes}  # at the start of self.step
        self._items, self._windows, self._after = None, None, {}
        self.skipped: Counter = Counter()
        self._skipped_by_worker: dict[int, dict] = {}
        self._skips_reported, self._report_time = 0, 0.0

    def __iter__(self):
        return self

    def _start(self) -> None:
        stream = RankStream(self.plan, self.tokenizer, self.lanes, dict(self.cursors), self.step, self.seq_len,
                            self.mode)
        if not self.workers:
            self._items = iter(stream)
            return
        # its own generator: a DataLoader draws worker seeds from the global RNG otherwise
        self._items = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.workers,
                                                       collate_fn=_as_is, prefetch_factor=4,
                                                       generator=torch.Generator()))

    def _fetch_step(self) -> None:
        """This rank's windows of the current step, and its lanes' cursors after it."""
        n = max(1, self.workers)
        windows = np.empty((self.per_rank, self.seq_len + 1), dtype=np.int32)
        after = {}
        for worker in range(n):
            item = next(self._items)
            if "exhausted" in item:
                raise data.DataExhausted(f"the streamed train split ran out at step {item['step'] + 1}: lane "
                                         f"{item['exhausted']} of {self.plan.lanes} has read all its documents; "
                                         f"add data or set train.allow_repetition true")
            if "error" in item:
                raise StreamError(item["error"])
            assert item["step"] == self.step, (item["step"], self.step)
            windows[worker::n] = item["windows"]
            after.update(zip(self.lanes[worker::n], item["cursors"]))
            self._skipped_by_worker[worker] = item["skipped"]
        self._windows, self._after = windows, after
        self._report_skips()

    def _report_skips(self) -> None:
        self.skipped = sum((Counter(c) for c in self._skipped_by_worker.values()), Counter())
        total = sum(self.skipped.values())
        if total > self._skips_reported and time.time() - self._report_time > self.SKIP_REPORT_SECONDS:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
            print(f"warning: rank {self.rank} skipped {total} unusable records of the stream so far ({reasons})",
                  file=sys.stderr)
            self._skips_reported, self._report_time = total, time.time()

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._items is None:
            self._start()
        if self._windows is None:
            self._fetch_step()
        first = self.micro * self.micro_batch
        batch = to_batch(self._windows[first: first + self.micro_batch], self.pad_id)
        self.micro += 1
        if self.micro == self.micro_per_step:
            self.step, self.micro, self._windows = self.step + 1, 0, None
            self.cursors.update(self._after)
        return batch

    def close(self) -> None:
        """Stops the loader workers (they are restarted by the next next())."""
        self._items, self._windows = None, None

    def state_dict(self) -> dict:
        """The position of the whole stream: every lane's cursor, gathered from all ranks (a collective
        when there are several: every rank calls it at the same step, as a checkpoint does)."""
        lanes = {}
        for share in all_gather_object(self.cursors):
            lanes.update(share)
        return {"stream": STATE_FORMAT, "step": self.step, "micro": self.micro, "lanes": lanes,
                "plan": self.plan.describe(), "tokenizer": self.tokenizer_hash, "mode": self.mode,
                "seq_len": self.seq_len, "global_batch": self.global_batch, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("stream") != STATE_FORMAT:
            raise ValueError("the loader state is not a streamed run's (data.source stream); resume it with the "
                             "data source it was saved with")
        if state["global_batch"] != self.global_batch:
            raise ValueError(f"the loader state was saved with global batch {state['global_batch']}, "
                             f"not {self.global_batch}")
        if (state["mode"], state["seq_len"]) != (self.mode, self.seq_len) or state["tokenizer"] != self.tokenizer_hash:
            raise ValueError("the loader state was saved with another data.mode, data.seq_len or tokenizer")
        if state["plan"] != json.loads(json.dumps(self.plan.describe())):
            raise ValueError(f"the loader state belongs to another stream (source, shards or data.seed differ): saved "
                             f"{state['plan']}, now {self.plan.describe()}")
        if state["micro"] and state["world_size"] != self.world_size:
            raise ValueError(f"the loader state was saved mid-step on {state['world_size']} ranks; it resumes on "
                             f"another number of ranks only at a step boundary")
        missing = [j for j in self.lanes if j not in state["lanes"]]
        if missing:
            raise ValueError(f"the loader state lacks the cursors of lanes {missing[:4]}...")
        self.close()
        self.step, self.micro = state["step"], state["micro"]
        self.cursors = {j: list(state["lanes"][j]) for j in self.lanes}


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
    """np.load(path), or compute() saved there first (atomically: concurrent writers are harmless)."""
    if path.is_file():
        return np.load(path)
    array = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)
    return array


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
        self.train = open_split(data_cfg.raw, "train", train_name)
        self._validation, self._validation_name = None, val_name

    @property
    def validation(self):
        if self._validation is None:
            self._validation = open_split(self.cfg.raw, "validation", self._validation_name)
        return self._validation

    def model_vocab_size(self, configured: int) -> int:
        return data.model_vocab_size({"tokenizer": self.tok.describe()}, configured)

    def train_loader(self, global_batch: int, micro_batch: int, allow_repetition: bool) -> StreamLoader:
        plan = Plan(self.train, global_batch, self.cfg.seed, allow_repetition)
        return StreamLoader(plan, self.cfg.tokenizer, self.tok.hash, self.pad_id, self.cfg.seq_len, self.cfg.mode,
                            global_batch, micro_batch, self.rank, self.world_size, self.cfg.loader_workers)

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

        return _cached_array(self.cache_path("validation", key), read)

    def validation_batches(self, micro_batch: int, n_tokens: int, after_tokens: int = 0) -> list:
        """This rank's share of the validation windows, as data.validation_batches shares them out
        (round-robin; every rank as many batches as rank 0, padded with fully masked ones). Rank 0
        reads them and broadcasts them (a collective; without a process group each reads them)."""
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
        T = self.cfg.seq_len
        padding = (torch.full((micro_batch, T), self.pad_id, dtype=torch.int64),
                   torch.full((micro_batch, T), data.IGNORE, dtype=torch.int64))
        return batches + [padding] * (most - len(batches))

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
