"""Streaming (data.source stream): every document once per pass on uneven shards, whatever the lanes,
a step's data independent of the number of ranks or workers, shuffled and mixed sources, exact
resume (a killed run, another number of ranks, 3 ranks on 5 shards), the fixed and cached validation
set, token budgets, the paper's sequences, damaged data counted, the hub's retries, one-line errors."""
from __future__ import annotations

import gzip
import itertools
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, TINY, as_cli, losses
from megatron_lax.training import checkpoint
from megatron_lax.data import tokens as data
from megatron_lax.data import streaming
from megatron_lax.config import DataConfig, load_config
from megatron_lax.data.tokens import DataExhausted
from megatron_lax.data.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).parents[1] / "parallel"))
from train_runs import launch  # noqa: E402

TOKENIZER = str(REPO / "tokenizer" / "sample")
SHARD_DOCUMENTS = [23, 10, 17, 12, 31]  # 5 uneven train shards: 93 documents
UNEVEN = [30, 60, 90, 120, 150]  # the shards: 450 documents of held-out English text


def sample_texts() -> list[str]:
    with gzip.open(REPO / "data" / "sample" / "c4-train.00000-of-00001.json.gz", "rt") as f:
        return [json.loads(line)["text"] for line in f]


def write_shards(root: Path, texts: list[str], counts: list[int], validation: Path) -> Path:
    """C4-layout train shards of `counts` documents, each starting with its record number."""
    root.mkdir(parents=True, exist_ok=True)
    start = 0
    for shard, count in enumerate(counts):
        with gzip.open(root / f"c4-train.{shard:05d}-of-{len(counts):05d}.json.gz", "wt") as f:
            for i in range(start, start + count):
                f.write(json.dumps({"text": f"record {i:05d}. {texts[i]}", "timestamp": "", "url": ""}) + "\n")
        start += count
    (root / "c4-validation.00000-of-00001.json.gz").write_bytes(validation.read_bytes())
    return root


def english_texts() -> list[str]:
    with gzip.open(REPO / "data" / "english" / "c4-train.00000-of-00001.json.gz", "rt") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("uneven"), english_texts(), UNEVEN,
                        REPO / "data" / "english" / "c4-validation.00000-of-00001.json.gz")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """5 C4-layout train shards of uneven size whose documents start with a unique record number, and
    the sample's validation shard. One bad line and one empty text are skipped."""
    root = tmp_path_factory.mktemp("c4")
    texts, start = sample_texts(), 0
    for shard, count in enumerate(SHARD_DOCUMENTS):
        with gzip.open(root / f"c4-train.{shard:05d}-of-00005.json.gz", "wt") as f:
            for i in range(start, start + count):
                f.write(json.dumps({"text": f"record {i:05d}. {texts[i]}", "timestamp": "", "url": ""}) + "\n")
            if shard == 1:
                f.write("{not json\n" + json.dumps({"text": "  ", "url": ""}) + "\n")
        start += count
    (root / "c4-validation.00000-of-00001.json.gz").write_bytes(
        (REPO / "data" / "sample" / "c4-validation.00000-of-00001.json.gz").read_bytes())
    return root


def stream_of(raw, tmp_path, mode="packed", seq_len=32, workers=0, seed=0, rank=0, world=1, sources=(),
              buffer=1000) -> streaming.Stream:
    cfg = DataConfig(raw=str(raw), tokenizer=TOKENIZER, source="stream", stream_cache=str(tmp_path / "cache"),
                     mode=mode, seq_len=seq_len, seed=seed, loader_workers=workers, sources=list(sources),
                     shuffle_buffer=buffer)
    return streaming.Stream(cfg, rank, world)


def documents_by_tokens(seq_len: int) -> dict[tuple, int]:
    """Each train document's paper-mode window (its first seq_len tokens, then EOS) -> its record number."""
    tok = load_tokenizer(TOKENIZER)
    texts = [f"record {i:05d}. {t}" for i, t in enumerate(sample_texts()[: sum(SHARD_DOCUMENTS)])]
    return {tuple(ids[:seq_len] + [tok.eos_id]): i for i, ids in enumerate(tok.encode_batch(texts))}


def rows(batch) -> list[tuple]:
    """Each sequence of a micro-batch as (inputs..., targets...)."""
    return [tuple(r.tolist()) for r in torch.cat(batch, dim=1)]


def paper_window(row: tuple, seq_len: int = 32) -> tuple:
    """The document window a paper-mode sequence was cut from: its first input, then its scored targets."""
    return (row[0], *(t for t in row[seq_len:] if t != data.IGNORE))


def global_steps(raw, tmp_path, world: int, micro: int, steps: int, workers: int, mode="packed", batch=6) -> list:
    """The rows of each step's global batch, gathered from `world` ranks' loaders in rank order."""
    loaders = [stream_of(raw, tmp_path, mode, workers=workers, rank=r, world=world).train_loader(batch, micro, True)
               for r in range(world)]
    per_rank = batch // world // micro
    return [[row for loader in loaders for _ in range(per_rank) for row in rows(next(loader))] for _ in range(steps)]


@pytest.mark.parametrize("mode", ["packed", "paper"])
def test_a_step_is_the_same_on_1_2_and_3_ranks_and_any_number_of_workers(shards, tmp_path, mode):
    reference = global_steps(shards, tmp_path, world=1, micro=6, steps=4, workers=0, mode=mode)
    assert global_steps(shards, tmp_path, world=3, micro=1, steps=4, workers=2, mode=mode) == reference
    assert global_steps(shards, tmp_path, world=2, micro=3, steps=4, workers=3, mode=mode) == reference
    assert len({row for step in reference for row in step}) == 24  # nothing repeats


def lane_streams(loader, steps: int) -> list[list[int]]:
    """Each lane's tokens over `steps` steps of a one-rank loader whose micro batch is the global batch
    (row j is lane j): a window's first token, then every target."""
    streams = None
    for _ in range(steps):
        inputs, targets = next(loader)
        if streams is None:
            streams = [[int(x)] for x in inputs[:, 0]]
        for stream, row in zip(streams, targets.tolist()):
            stream.extend(row)
    return streams


def test_one_pass_of_uneven_shards_trains_on_every_document_once_whatever_the_lanes(uneven, tmp_path):
    """The issue's case: 5 shards of 30 to 150 documents, 12 lanes, no repetition. Packed: the pass is
    >= 99% of the tokens prepare counts, no document twice, and it ends for every lane at once."""
    stream = stream_of(uneven, tmp_path)
    loader = stream.train_loader(12, 12, allow_repetition=False)
    tok, eos = stream.tok, stream.tok.eos_id
    pass_tokens = int(loader.plans[0].index.tokens.sum())
    in_parallel = streaming.Index(stream.train, tok, tmp_path / "other_cache", workers=2)  # pool workers count
    assert all(np.array_equal(in_parallel.sizes(s), loader.plans[0].index.sizes(s)) for s in range(5))
    texts = [f"record {i:05d}. {t}" for i, t in enumerate(english_texts()[: sum(UNEVEN)])]
    assert pass_tokens == sum(len(ids) + 1 for ids in tok.encode_batch(texts))  # prepare's count
    streams = lane_streams(loader, loader.steps_per_pass)
    trained = sum(len(s) - 1 for s in streams)
    assert trained == loader.steps_per_pass * 12 * 32 and trained >= 0.99 * pass_tokens, (trained, pass_tokens)
    with pytest.raises(DataExhausted):
        next(loader)  # the pass has ended for every lane at the same step
    known = {tuple(ids + [eos]): i for i, ids in enumerate(tok.encode_batch(texts))}
    seen = Counter()
    for s in streams:
        pieces, piece = [], []
        for t in s:
            piece.append(t)
            if t == eos:
                pieces.append(tuple(piece))
                piece = []
        seen.update(known[p] for p in pieces if p in known)
    # whole in some lane: all but the two a lane shares with its neighbours and the one its last window cuts
    assert max(seen.values()) == 1 and len(seen) >= sum(UNEVEN) - 3 * 12
    paper = stream_of(uneven, tmp_path, "paper").train_loader(12, 4, allow_repetition=False)
    assert paper.steps_per_pass == sum(UNEVEN) // 12 == 37
    windows = {tuple(ids[:32] + [eos]): i for i, ids in enumerate(tok.encode_batch(texts))}
    read = Counter(windows[paper_window(row)] for _ in range(37 * 3) for row in rows(next(paper)))
    assert len(read) == 37 * 12 and max(read.values()) == 1


def test_a_step_is_the_same_on_uneven_shards_for_any_ranks_and_workers(uneven, tmp_path):
    reference = global_steps(uneven, tmp_path, world=1, micro=12, steps=3, workers=0, batch=12)
    assert global_steps(uneven, tmp_path, world=4, micro=1, steps=3, workers=2, batch=12) == reference


def test_documents_are_shuffled_per_pass_by_a_seeded_buffer(shards, tmp_path):
    def documents(buffer, seed=0, passes=2):
        known = documents_by_tokens(32)
        loader = stream_of(shards, tmp_path, "paper", seed=seed, buffer=buffer).train_loader(6, 6, True)
        per_pass = [[known[paper_window(row)] for _ in range(loader.steps_per_pass) for row in rows(next(loader))]
                    for _ in range(passes)]
        return per_pass

    plain, shuffled = documents(0), documents(1000)
    assert plain != shuffled and shuffled == documents(1000)  # seeded: the same order again
    assert shuffled[0] != shuffled[1]  # each pass its own order, of all but the 93 mod 6 documents left over
    assert all(len(set(p)) == 90 for p in shuffled) and len(set(shuffled[0]) ^ set(shuffled[1])) <= 6
    assert documents(1000, seed=1) != shuffled
    lane0 = [d for i, d in enumerate(plain[0]) if i % 6 == 0]
    assert lane0 == sorted(lane0)  # without a buffer a lane reads its documents in file order (shards shuffled)


def test_weighted_sources_share_every_step_and_resume_exactly(uneven, shards, tmp_path):
    sources = [f"{uneven}=2", f"{shards}=1"]
    loader = stream_of(uneven, tmp_path, "paper", sources=sources).train_loader(6, 3, allow_repetition=True)
    assert [p.lanes for p in loader.plans] == [[0, 2, 3, 5], [1, 4]]  # 2:1, in each half of the step too
    english = {tuple(ids[:32] + [1]): i for i, ids in enumerate(load_tokenizer(TOKENIZER).encode_batch(
        [f"record {i:05d}. {t}" for i, t in enumerate(english_texts()[: sum(UNEVEN)])]))}
    steps = [rows(next(loader)) + rows(next(loader)) for _ in range(4)]
    for step in steps:
        assert [paper_window(r) in english for r in step] == [True, False, True, True, False, True]
    assert loader.source_sequences() == {str(uneven): 16, str(shards): 8}
    state = loader.state_dict()
    expected = [rows(next(loader)) for _ in range(6)]
    two = [stream_of(uneven, tmp_path, "paper", sources=sources, rank=r, world=2).train_loader(6, 3, True)
           for r in range(2)]
    for other in two:
        other.load_state_dict(state)
    assert [rows(next(two[0])) + rows(next(two[1])) for _ in range(3)] == \
        [expected[i] + expected[i + 1] for i in (0, 2, 4)]
    with pytest.raises(ValueError, match="another stream"):
        stream_of(uneven, tmp_path, "paper", sources=[f"{uneven}=1", f"{shards}=1"]).train_loader(
            6, 3, True).load_state_dict(state)
    with pytest.raises(streaming.StreamError, match="PATH=WEIGHT"):
        streaming.parse_sources([f"{uneven}=heavy"])


def test_damaged_shards_are_named_skipped_and_counted(tmp_path, capfd):
    texts = english_texts()
    root = write_shards(tmp_path / "damaged", texts, [20, 20, 20, 20], REPO / "data" / "english" /
                        "c4-validation.00000-of-00001.json.gz")
    with gzip.open(root / "c4-validation.00000-of-00001.json.gz", "wt") as f:  # a small validation split
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[-3:])
    truncated = root / "c4-train.00002-of-00004.json.gz"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (root / "c4-train.00003-of-00004.json.gz").write_bytes(b"")  # empty
    loader = stream_of(root, tmp_path, "paper").train_loader(6, 6, allow_repetition=True)
    warned = capfd.readouterr().err
    assert "c4-train.00003-of-00004.json.gz hold no readable document; skipped" in warned
    assert loader.damage()["truncated_file"] == 1
    assert 40 < loader.steps_per_pass * 6 < 60  # two whole shards and the readable half of one
    for _ in range(loader.steps_per_pass + 2):
        next(loader)  # the run goes on
    assert loader.state_dict()["skipped"]["truncated_file"] == 1
    stream = stream_of(root, tmp_path, "paper")
    stream.validation_windows(10_000_000)
    assert "holds only" in capfd.readouterr().err  # fewer validation tokens than asked: one line
    for cached in (tmp_path / "cache").glob("*.np*"):
        cached.write_bytes(b"")  # zero-byte cache files: read again
    again = stream_of(root, tmp_path, "paper")
    assert again.train_loader(6, 6, True).damage()["truncated_file"] == 1
    assert len(again.validation_windows(3000)) > 0
    assert "unreadable" in capfd.readouterr().err


def galore_sequence(tokenizer, text: str, max_length: int) -> list[int]:
    """GaLore's and CoLA's dataloader, written out: the T5 tokenizer's call on one document."""
    return tokenizer(text, max_length=max_length, truncation=True, padding="max_length")["input_ids"]


def test_paper_mode_gives_galore_and_colas_sequences(shards, tmp_path):
    """Their call, with a T5 tokenizer made of the sample SentencePiece vocabulary (T5's tokenizer is a
    SentencePiece one that appends EOS), on the documents it splits as SentencePiece does (it lacks
    the model's normalisation table): a truncated document ends in EOS; padding is not scored."""
    import sentencepiece
    from transformers import T5Tokenizer
    sp = sentencepiece.SentencePieceProcessor(model_file=str(Path(TOKENIZER) / "tokenizer.model"))
    t5 = T5Tokenizer(vocab=[(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())], extra_ids=0)
    loader = stream_of(shards, tmp_path, "paper", buffer=0).train_loader(6, 6, True)
    texts = sample_texts()
    checked = truncated = 0
    for _ in range(8):
        inputs, targets = next(loader)
        for x, y in zip(inputs.tolist(), targets.tolist()):
            window = [x[0]] + [t for t in y if t != data.IGNORE]
            assert window[-1] == t5.eos_token_id  # a truncated document too
            assert len(x) == 32 and all(p == 0 for p in x[len(window) - 1:])  # padding
            record = int(re.match(r"record (\d{5})\.", sp.decode(window)).group(1))
            text = f"record {record:05d}. {texts[record]}"
            if t5(text)["input_ids"] != sp.encode(text) + [t5.eos_token_id]:
                continue
            expected = galore_sequence(t5, text, 33)
            assert window == [t for t in expected if t != t5.pad_token_id]
            checked, truncated = checked + 1, truncated + (len(window) == 33)
    assert checked >= 6 and truncated >= 3, (checked, truncated)


def test_loader_state_resumes_exactly_mid_step_and_onto_other_rank_counts(shards, tmp_path):
    reference = stream_of(shards, tmp_path, workers=2).train_loader(6, 2, True)
    expected = [rows(next(reference)) for _ in range(15)]  # 5 steps of 3 micro-batches
    first = stream_of(shards, tmp_path).train_loader(6, 2, True)
    for _ in range(7):
        next(first)
    state = first.state_dict()  # mid-step (micro 1 of step 2)
    again = stream_of(shards, tmp_path, workers=1).train_loader(6, 2, True)
    again.load_state_dict(state)
    assert [rows(next(again)) for _ in range(8)] == expected[7:]
    with pytest.raises(ValueError, match="mid-step on 1 ranks"):
        stream_of(shards, tmp_path, rank=0, world=3).train_loader(6, 2, True).load_state_dict(state)
    next(first), next(first)  # to the step boundary: 3 ranks continue it
    state = first.state_dict()
    three = [stream_of(shards, tmp_path, workers=1, rank=r, world=3).train_loader(6, 2, True) for r in range(3)]
    for loader in three:
        loader.load_state_dict(state)
    assert [row for loader in three for row in rows(next(loader))] == [row for b in expected[9:12] for row in b]
    with pytest.raises(ValueError, match=r"an older streamed loader's \(one cursor per lane\); it cannot"):
        again.load_state_dict({"stream": 1, "lanes": {}})
    for change, message in (({"seed": 1}, "another stream"), ({"seq_len": 16}, "another data.mode")):
        with pytest.raises(ValueError, match=message):
            stream_of(shards, tmp_path, **change).train_loader(6, 2, True).load_state_dict(state)


def paper_rule(batches: list, mode: str) -> list:
    """Prepared paper-mode batches as the paper cuts documents: a truncated one ends in EOS."""
    if mode == "packed":
        return batches
    eos = load_tokenizer(TOKENIZER).eos_id
    for _, targets in batches:
        targets[:, -1] = torch.where(targets[:, -1] == data.IGNORE, data.IGNORE, eos)
    return batches


@pytest.mark.parametrize("mode", ["packed", "paper"])
def test_validation_is_the_prepared_validation_set_on_any_rank_count_and_is_cached(prepared_sample, tmp_path, mode,
                                                                                   monkeypatch):
    for world in (1, 3):
        for rank in range(world):
            stream = stream_of(REPO / "data" / "sample", tmp_path, mode, rank=rank, world=world)
            got = stream.validation_batches(4, 3000)
            expected = paper_rule(data.validation_batches(prepared_sample, 32, 4, 3000, mode, rank, world), mode)
            assert len(got) == len(expected)
            assert all(torch.equal(a, b) for g, e in zip(got, expected) for a, b in zip(g, e)), (world, rank)
    selection = stream_of(REPO / "data" / "sample", tmp_path, mode).validation_batches(4, 2000, after_tokens=3000)
    expected = paper_rule(data.validation_batches(prepared_sample, 32, 4, 2000, mode, after_tokens=3000), mode)
    assert all(torch.equal(a, b) for g, e in zip(selection, expected) for a, b in zip(g, e))
    assert len(list((tmp_path / "cache").glob("validation-*.npy"))) == 2

    def unread(*args):
        raise AssertionError("the validation split was read again")

    monkeypatch.setattr(streaming, "validation_windows_from", unread)
    again = stream_of(REPO / "data" / "sample", tmp_path, mode).validation_batches(4, 3000)
    expected = paper_rule(data.validation_batches(prepared_sample, 32, 4, 3000, mode), mode)
    assert all(torch.equal(a, b) for g, e in zip(again, expected) for a, b in zip(g, e))


def test_unigram_baseline_matches_prepared_shards(prepared_sample, tmp_path):
    streamed = stream_of(REPO / "data" / "sample", tmp_path).unigram_perplexity(3000)
    assert streamed == pytest.approx(data.unigram_perplexity(prepared_sample, 32, "packed", 3000), rel=1e-9)
    assert list((tmp_path / "cache").glob("unigram-*.npy"))


def trainer_steps(source: str, prepared, budget: str, cache: Path, repeat: bool = True) -> int:
    from megatron_lax.train import make_trainer
    values = {**TINY, "data.path": prepared, "data.raw": REPO / "data" / "sample", "data.tokenizer": TOKENIZER,
              "data.stream_cache": cache,
              "data.source": source, "train.token_budget": budget, "train.allow_repetition": repeat,
              "train.eval_tokens": 256}
    trainer = make_trainer(load_config("llama_tiny", {k: str(v) for k, v in values.items()}))
    return trainer.task.total_steps


def test_token_budgets_mean_what_they_mean_with_prepared_shards(prepared_sample, tmp_path):
    """... and a budget longer than one pass of the stream is refused without train.allow_repetition."""
    for budget in ("20k", "chinchilla"):
        assert trainer_steps("stream", prepared_sample, budget, tmp_path) == \
            trainer_steps("prepared", prepared_sample, budget, tmp_path)
    assert trainer_steps("stream", prepared_sample, "20k", tmp_path) == 79  # ceil(20,000 / (8 x 32))
    with pytest.raises(ValueError, match="set train.steps or train.token_budget"):
        trainer_steps("stream", prepared_sample, "0", tmp_path)
    with pytest.raises(ValueError, match=r"one pass of the stream \(packed mode\) offers [\d,]+ \(\d+ steps\); add "
                                         r"data or set train.allow_repetition true"):
        trainer_steps("stream", prepared_sample, "2M", tmp_path, repeat=False)


STEPS = 6
RUN = {**TINY, "data.source": "stream", "data.tokenizer": TOKENIZER, "model.method": "svd", "optim.lr": 1e-2,
       "train.steps": STEPS, "train.global_batch": 6, "train.micro_batch": 1, "train.eval_tokens": 960,
       "logging.log_every": 1, "checkpoint.every": 2, "checkpoint.keep": 3, "train.eval_every": 2,
       "logging.lax_stats_every": 0}


def run(command, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def train_command(shards, run_dir, faults: bool = False, **extra) -> list[str]:
    """The training command; with `faults`, through tests/fault_injection.py (the faults in the environment)."""
    values = {**RUN, "data.raw": shards, "data.stream_cache": run_dir / "cache", "logging.run_dir": run_dir,
              "data.loader_workers": 2, **extra}
    entry = "tests.fault_injection" if faults else "megatron_lax.train"
    return [sys.executable, "-m", entry, "--config", "llama_tiny", *as_cli(values)]


def test_a_killed_streamed_run_resumes_with_the_losses_of_an_uninterrupted_one(shards, tmp_path):
    full = run(train_command(shards, tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run(train_command(shards, tmp_path / "killed", faults=True), env={"MEGATRON_LAX_TEST_KILL_AT_STEP": "5"})
    assert killed.returncode == -signal.SIGKILL
    resumed = run(train_command(shards, tmp_path / "killed", **{"checkpoint.resume": "auto"}))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_00000004" in resumed.stdout
    assert losses(tmp_path / "killed") == losses(tmp_path / "full")  # bitwise: the same sequences, same order
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    read = [r for r in records if "val_loss" in r][-1]
    assert read["skipped_bad_json"] == read["skipped_empty"] == 1 and read["sequences_stream"] == 6 * STEPS
    assert "the train split's records skipped: 2 (bad_json 1, empty 1)" in full.stdout
    from megatron_lax.evaluate import evaluate_checkpoint  # a streamed run's checkpoint evaluates on its stream
    final = json.loads((tmp_path / "full" / "finished.json").read_text())
    evaluated = evaluate_checkpoint(tmp_path / "full")
    assert evaluated["tokens"] == final["val_tokens"] == 960 and evaluated["step"] == STEPS
    assert evaluated["val_loss"] == pytest.approx(final["val_loss"], rel=1e-5)
    assert evaluated["unigram_ppl"] == pytest.approx(final["unigram_ppl"], rel=1e-9)
    step = tmp_path / "killed" / "checkpoints" / checkpoint.step_dir_name(STEPS)
    prepared = checkpoint.checkpoint_config(step)
    prepared.data.source = "prepared"
    with pytest.raises(checkpoint.CheckpointError, match="data.source: 'stream' -> 'prepared'"):
        checkpoint.check_compatible(step, prepared)


def test_a_full_pass_of_two_mixed_sources_on_three_ranks_resumes_on_two_with_the_same_losses(uneven, shards,
                                                                                            tmp_path):
    """The issue's end state: uneven local shards and a second corpus mixed 2:1, shuffled, a whole pass
    without repetition on 3 ranks, resumed from its middle on 2: the same losses (DDP's tolerance) and
    validation, and the pass trained to its last step."""
    sources = [f"{uneven}=2", f"{shards}=1"]
    pass_steps = stream_of(uneven, tmp_path, "paper", sources=sources).train_loader(6, 1, False).steps_per_pass

    def spec(run_dir, **extra):
        return {"overrides": {**RUN, "data.raw": shards, "data.sources": ",".join(sources), "data.mode": "paper",
                              "data.stream_cache": tmp_path / "cache", "logging.run_dir": run_dir,
                              "parallel.engine": "ddp", "data.loader_workers": 1, "train.steps": pass_steps,
                              "train.allow_repetition": False, "checkpoint.every": 20, "train.eval_every": 20,
                              "logging.log_every": 1, **extra}}

    launch([spec(tmp_path / "three")], tmp_path, nproc=3, timeout=240)
    resume_from = tmp_path / "three" / "checkpoints" / checkpoint.step_dir_name(20)
    launch([spec(tmp_path / "two", **{"checkpoint.resume": resume_from})], tmp_path, nproc=2, timeout=240)
    three, two = losses(tmp_path / "three"), losses(tmp_path / "two")
    assert pass_steps == 46 and sorted(two) == list(range(21, pass_steps + 1))  # 93 documents over 2 lanes
    assert all(two[s] == pytest.approx(three[s], rel=1e-5) for s in two), (two, three)
    finished = json.loads((tmp_path / "two" / "finished.json").read_text())
    assert finished["steps"] == pass_steps and finished["sequences_" + str(uneven)] == 4 * pass_steps
    validations = {}
    for name in ("three", "two"):
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        validations[name] = {r["step"]: (r["val_loss"], r["val_tokens"]) for r in records if "val_loss" in r}
    two, three = validations["two"], validations["three"]
    assert two and all(two[s][1] == three[s][1] == 960 and two[s][0] == pytest.approx(three[s][0], rel=1e-5)
                       for s in two)


@pytest.mark.skipif(not os.environ.get("MEGATRON_LAX_SLOW_TESTS"), reason="slow (about 1 min on 2 cores: 8 + 5 ranks "
                    "with 2 loader workers each); run with MEGATRON_LAX_SLOW_TESTS=1")
def test_eight_ranks_with_two_workers_each_on_many_small_shards_resume_on_five(tmp_path):
    raw = write_shards(tmp_path / "many", english_texts(), [3 + i % 5 for i in range(40)],
                       REPO / "data" / "english" / "c4-validation.00000-of-00001.json.gz")

    def spec(run_dir, **extra):
        return {"overrides": {**RUN, "data.raw": raw, "data.stream_cache": tmp_path / "cache", "train.steps": 4,
                              "logging.run_dir": run_dir, "parallel.engine": "ddp", "data.loader_workers": 2,
                              "train.global_batch": 40, "train.micro_batch": 1, "train.eval_every": 0,
                              "train.eval_tokens": 320, **extra}}

    launch([spec(tmp_path / "eight")], tmp_path, nproc=8, timeout=400)
    resume_from = tmp_path / "eight" / "checkpoints" / checkpoint.step_dir_name(2)
    launch([spec(tmp_path / "five", **{"checkpoint.resume": resume_from})], tmp_path, nproc=5, timeout=400)
    eight, five = losses(tmp_path / "eight"), losses(tmp_path / "five")
    assert sorted(five) == [3, 4] and all(five[s] == pytest.approx(eight[s], rel=1e-5) for s in five), (five, eight)


def test_the_hub_route_reads_what_the_local_route_reads(shards, tmp_path):
    """HubSplit (datasets' streaming, its own shards) on a local folder: the same index and the same
    lanes' windows as the local reader."""
    clean = tmp_path / "clean"  # datasets' JSON reader stops at a bad line; the local reader skips it
    clean.mkdir()
    for path in sorted(shards.glob("c4-*.json.gz")):
        if "00001-of" not in path.name:
            (clean / path.name).write_bytes(path.read_bytes())
    hub = streaming.HubSplit("hf:test/local", str(clean), None, "train")
    local = streaming.open_split(str(clean), "train", "train")
    assert hub.n_shards == local.n_shards == 4
    tok = load_tokenizer(TOKENIZER)
    for mode in ("packed", "paper"):
        plans = [streaming.SourcePlan("x", streaming.Index(split, tok, tmp_path / "cache"), list(range(4)), 2, 0,
                                      mode, 32, 8) for split in (hub, local)]
        assert all(np.array_equal(plans[0].index.sizes(s), plans[1].index.sizes(s)) for s in range(4))
        for k in range(4):
            lanes = [streaming.Lane(plan, k, tok, 0, Counter()) for plan in plans]
            assert all(np.array_equal(lanes[0].next_window(), lanes[1].next_window()) for _ in range(8))
    validation = [streaming.HubSplit("hf:test/local", str(clean), None, "validation"),
                  streaming.open_split(str(clean), "validation", "validation")]
    windows = [streaming.validation_windows_from(split, tok, 32, "packed") for split in validation]
    assert all(np.array_equal(next(windows[0])[0], next(windows[1])[0]) for _ in range(50))


def test_only_rank_0_asks_the_hub_for_its_file_list(shards, tmp_path, monkeypatch):
    opened = streaming.HubSplit("hf:test/local", str(shards), None, "validation").dataset
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("rank 1 asked the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.setattr(streaming, "_rank", lambda: 1)
    monkeypatch.setattr(streaming, "broadcast_object", lambda obj: opened)  # what rank 0 sends
    assert streaming.HubSplit("hf:test/local", str(shards), None, "validation").dataset is opened


def test_a_hub_read_error_is_retried_from_where_it_stopped(shards, tmp_path, capfd):
    hub = streaming.HubSplit("hf:test/local", str(shards), None, "validation")
    hub.BACKOFF_SECONDS = 0.0
    expected = list(itertools.islice(hub.documents(0, Counter()), 40))
    rows, failures = hub.rows, iter([7, 19, 31])

    def flaky(shard):  # the reader fails at row 7, then 19, then 31 of the shard
        fail_at = next(failures, None)
        for i, row in enumerate(rows(shard)):
            if i == fail_at:
                raise ConnectionError("connection reset by peer")
            yield row

    hub.rows = flaky
    assert list(itertools.islice(hub.documents(0, Counter()), 40)) == expected
    assert capfd.readouterr().err.count("retry") == 3

    def broken(shard):
        raise ConnectionError("HTTP 429")
        yield

    hub.rows = broken
    with pytest.raises(streaming.StreamError, match=r"reading shard 0 of split 'validation' failed 6 times \("):
        list(hub.documents(0, Counter()))


def test_a_hub_source_without_a_network_fails_in_one_line(tmp_path):
    values = {**RUN, "data.raw": "hf:allenai/c4/en", "logging.run_dir": tmp_path}
    result = run([sys.executable, "-m", "megatron_lax.train", "--config", "llama_tiny", *as_cli(values)],
                 env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: hf:allenai/c4/en: cannot open split 'train' on the Hugging Face hub (")
    assert "Traceback" not in result.stderr
    with pytest.MonkeyPatch.context() as patch:  # nothing listens there: one line at once, for data and tokenizer
        patch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
        unreachable = "the Hugging Face hub (127.0.0.1:9) cannot be reached in 3 s (ConnectionRefusedError); use a " \
                      "local copy, or set HF_HUB_OFFLINE=1 to use the hub's cache"
        with pytest.raises(streaming.StreamError) as error:
            streaming.open_split("hf:allenai/c4/en", "train", "train")
        assert str(error.value) == f"hf:allenai/c4/en: {unreachable}"
        with pytest.raises(ValueError) as error:
            load_tokenizer("hf:t5-base")
        assert str(error.value) == f"tokenizer hf:t5-base: {unreachable}"
    with pytest.raises(streaming.StreamError, match="a hub source is hf:OWNER/NAME or hf:OWNER/NAME/CONFIG"):
        streaming.parse_hub_spec("hf:allenai")
    assert streaming.parse_hub_spec("hf:allenai/c4") == ("allenai/c4", "en")


def test_the_recipes_stream_a_hub_dataset_or_local_shards_when_data_says_so():
    from megatron_lax.config import add_config_arguments, config_from_args
    from megatron_lax.launch import STREAM_WORKERS, recipe

    def data_of(data_spec: str):
        import argparse
        parser = argparse.ArgumentParser()
        add_config_arguments(parser)
        args = recipe("1b", "cola", "identity", "ddp", "1", data_spec, "runs/x")
        return config_from_args(parser.parse_args(args)).data

    hub, local, prepared = data_of("hf:allenai/c4"), data_of("stream:/data/c4/en"), data_of("data/prepared/c4")
    assert (hub.source, hub.raw, hub.loader_workers, hub.mode) == ("stream", "hf:allenai/c4", STREAM_WORKERS, "paper")
    assert (local.source, local.raw) == ("stream", "/data/c4/en")
    assert (prepared.source, prepared.path) == ("prepared", "data/prepared/c4")
