"""Streaming (data.source stream): lanes deal every document to exactly one rank and worker, a step's
data does not depend on the number of ranks or workers, packing and padding match prepared shards,
exact resume (a lane from its cursor, a killed run, another number of ranks, 3 ranks on 5 shards),
the fixed and cached validation set, token budgets, and the one-line errors."""
from __future__ import annotations

import gzip
import json
import os
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


def sample_texts() -> list[str]:
    with gzip.open(REPO / "data" / "sample" / "c4-train.00000-of-00001.json.gz", "rt") as f:
        return [json.loads(line)["text"] for line in f]


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


def stream_of(raw, tmp_path, mode="packed", seq_len=32, workers=0, seed=0, rank=0, world=1) -> streaming.Stream:
    cfg = DataConfig(raw=str(raw), tokenizer=TOKENIZER, source="stream", stream_cache=str(tmp_path / "cache"),
                     mode=mode, seq_len=seq_len, seed=seed, loader_workers=workers)
    return streaming.Stream(cfg, rank, world)


def documents_by_tokens(seq_len: int) -> dict[tuple, int]:
    """Each train document's paper-mode window (its first seq_len + 1 tokens) -> its record number."""
    tok = load_tokenizer(TOKENIZER)
    texts = [f"record {i:05d}. {t}" for i, t in enumerate(sample_texts()[: sum(SHARD_DOCUMENTS)])]
    return {tuple((ids + [tok.eos_id])[: seq_len + 1]): i for i, ids in enumerate(tok.encode_batch(texts))}


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


def test_every_document_is_read_once_per_pass_by_exactly_one_lane(shards, tmp_path):
    """3 ranks x 2 workers on 5 shards: every lane read to its end (paper mode: a window per document)."""
    known, seen = documents_by_tokens(32), Counter()
    stream = stream_of(shards, tmp_path, "paper")
    plan = streaming.Plan(stream.train, 6, seed=0, repeat=False)
    assert plan.parts == 2 and plan.n_units == 10  # fewer shards than lanes: each shard dealt to 2 units
    for lane in range(6):
        reader = streaming.Lane(lane, plan, stream.tok, 32, "paper", [0, 0, 0, 0], Counter())
        with pytest.raises(streaming.LaneExhausted):
            while True:
                window = reader.next_window()
                seen[known[tuple(window[window >= 0].tolist())]] += 1
    assert seen == Counter(range(sum(SHARD_DOCUMENTS)))


def test_a_run_out_of_documents_stops_with_one_line_unless_repetition_is_allowed(shards, tmp_path):
    loader = stream_of(shards, tmp_path, "paper").train_loader(6, 6, allow_repetition=False)
    with pytest.raises(DataExhausted, match=r"the streamed train split ran out at step \d+: lane \d of 6 has read "
                                            r"all its documents; add data or set train.allow_repetition true"):
        for _ in range(100):
            next(loader)
    repeating = stream_of(shards, tmp_path, "paper").train_loader(6, 6, allow_repetition=True)
    known = documents_by_tokens(32)
    documents = [known[paper_window(row)] for _ in range(40) for row in rows(next(repeating))]
    assert len(documents) == 240 and set(documents) == set(range(sum(SHARD_DOCUMENTS)))


def test_packed_lanes_cut_their_documents_as_prepared_shards_do_and_resume_from_a_cursor(shards, tmp_path):
    stream = stream_of(shards, tmp_path)
    plan, T = streaming.Plan(stream.train, 6, seed=5, repeat=True), 16
    lane = streaming.Lane(4, plan, stream.tok, T, "packed", [0, 0, 0, 0], Counter())
    windows = [lane.next_window() for _ in range(100)]
    skipped = Counter()
    passes = [[d for unit in plan.lane_units(4, p) for d in plan.unit_documents(unit, skipped)] for p in (0, 1)]
    assert passes[0] != passes[1]  # each pass its own order of units
    encoded = streaming.encode_documents(stream.tok, passes[0] + passes[1], skipped)
    tokens = np.concatenate([d for d in encoded if d is not None])
    assert 100 * T + 1 <= len(tokens) and (len(tokens) - 1) // T // 2 < 100  # the windows reach into pass 1
    for i, window in enumerate(windows):  # a window every T tokens, T + 1 long, across the passes
        assert np.array_equal(window, tokens[i * T: i * T + T + 1])
    for k in (1, 7, 23):  # a lane rebuilt from its cursor after k windows continues exactly
        again = streaming.Lane(4, plan, stream.tok, T, "packed", [0, 0, 0, 0], Counter())
        for _ in range(k):
            again.next_window()
        resumed = streaming.Lane(4, plan, stream.tok, T, "packed", again.cursor(), Counter())
        assert all(np.array_equal(resumed.next_window(), w) for w in windows[k: k + 10])


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
    for change, message in (({"seed": 1}, "another stream"), ({"seq_len": 16}, "another data.mode")):
        with pytest.raises(ValueError, match=message):
            stream_of(shards, tmp_path, **change).train_loader(6, 2, True).load_state_dict(state)


@pytest.mark.parametrize("mode", ["packed", "paper"])
def test_validation_is_the_prepared_validation_set_on_any_rank_count_and_is_cached(prepared_sample, tmp_path, mode,
                                                                                   monkeypatch):
    for world in (1, 3):
        for rank in range(world):
            stream = stream_of(REPO / "data" / "sample", tmp_path, mode, rank=rank, world=world)
            got = stream.validation_batches(4, 3000)
            expected = data.validation_batches(prepared_sample, 32, 4, 3000, mode, rank, world)
            assert len(got) == len(expected)
            assert all(torch.equal(a, b) for g, e in zip(got, expected) for a, b in zip(g, e)), (world, rank)
    selection = stream_of(REPO / "data" / "sample", tmp_path, mode).validation_batches(4, 2000, after_tokens=3000)
    expected = data.validation_batches(prepared_sample, 32, 4, 2000, mode, after_tokens=3000)
    assert all(torch.equal(a, b) for g, e in zip(selection, expected) for a, b in zip(g, e))
    assert len(list((tmp_path / "cache").glob("validation-*.npy"))) == 2

    def unread(*args):
        raise AssertionError("the validation split was read again")

    monkeypatch.setattr(streaming, "validation_windows_from", unread)
    again = stream_of(REPO / "data" / "sample", tmp_path, mode).validation_batches(4, 3000)
    assert all(torch.equal(a, b) for g, e in zip(again, data.validation_batches(prepared_sample, 32, 4, 3000, mode))
               for a, b in zip(g, e))


def test_unigram_baseline_matches_prepared_shards(prepared_sample, tmp_path):
    streamed = stream_of(REPO / "data" / "sample", tmp_path).unigram_perplexity(3000)
    assert streamed == pytest.approx(data.unigram_perplexity(prepared_sample, 32, "packed", 3000), rel=1e-9)
    assert list((tmp_path / "cache").glob("unigram-*.npy"))


def trainer_steps(source: str, prepared, budget: str, cache: Path) -> int:
    from megatron_lax.train import make_trainer
    values = {**TINY, "data.path": prepared, "data.raw": REPO / "data" / "sample", "data.tokenizer": TOKENIZER,
              "data.stream_cache": cache,
              "data.source": source, "train.token_budget": budget, "train.allow_repetition": True,
              "train.eval_tokens": 256}
    trainer = make_trainer(load_config("llama_tiny", {k: str(v) for k, v in values.items()}))
    return trainer.task.total_steps


def test_token_budgets_mean_what_they_mean_with_prepared_shards(prepared_sample, tmp_path):
    for budget in ("20k", "chinchilla"):
        assert trainer_steps("stream", prepared_sample, budget, tmp_path) == \
            trainer_steps("prepared", prepared_sample, budget, tmp_path)
    assert trainer_steps("stream", prepared_sample, "20k", tmp_path) == 79  # ceil(20,000 / (8 x 32))
    with pytest.raises(ValueError, match="set train.steps or train.token_budget"):
        trainer_steps("stream", prepared_sample, "0", tmp_path)


STEPS = 6
RUN = {**TINY, "data.source": "stream", "data.tokenizer": TOKENIZER, "model.method": "svd", "optim.lr": 1e-2,
       "train.steps": STEPS, "train.global_batch": 6, "train.micro_batch": 1, "train.eval_tokens": 960,
       "logging.log_every": 1, "checkpoint.every": 2, "checkpoint.keep": 3, "train.eval_every": 2,
       "logging.lax_stats_every": 0}


def run(command, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def train_command(shards, run_dir, **extra) -> list[str]:
    values = {**RUN, "data.raw": shards, "data.stream_cache": run_dir / "cache", "logging.run_dir": run_dir,
              "data.loader_workers": 2, **extra}
    return [sys.executable, "-m", "megatron_lax.train", "--config", "llama_tiny", *as_cli(values)]


def test_a_killed_streamed_run_resumes_with_the_losses_of_an_uninterrupted_one(shards, tmp_path):
    full = run(train_command(shards, tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run(train_command(shards, tmp_path / "killed"), env={"MEGATRON_LAX_TEST_KILL_AT_STEP": "5"})
    assert killed.returncode == -signal.SIGKILL
    resumed = run(train_command(shards, tmp_path / "killed", **{"checkpoint.resume": "auto"}))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_00000004" in resumed.stdout
    assert losses(tmp_path / "killed") == losses(tmp_path / "full")  # bitwise: the same sequences, same order
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


def test_three_ranks_on_five_shards_resume_on_two_with_the_same_losses_and_validation(shards, tmp_path):
    def spec(run_dir, **extra):
        return {"overrides": {**RUN, "data.raw": shards, "data.stream_cache": tmp_path / "cache",
                              "logging.run_dir": run_dir, "parallel.engine": "ddp", "data.loader_workers": 1, **extra}}

    launch([spec(tmp_path / "three")], tmp_path, nproc=3, timeout=240)
    resume_from = tmp_path / "three" / "checkpoints" / checkpoint.step_dir_name(2)
    launch([spec(tmp_path / "two", **{"checkpoint.resume": resume_from})], tmp_path, nproc=2, timeout=240)
    three, two = losses(tmp_path / "three"), losses(tmp_path / "two")
    assert sorted(two) == [3, 4, 5, 6]
    assert all(two[s] == pytest.approx(three[s], rel=1e-5) for s in two), (two, three)
    validations = {}
    for name in ("three", "two"):
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        validations[name] = {r["step"]: (r["val_loss"], r["val_tokens"]) for r in records if "val_loss" in r}
    two, three = validations["two"], validations["three"]
    assert two and all(two[s][1] == three[s][1] == 960 and two[s][0] == pytest.approx(three[s][0], rel=1e-5)
                       for s in two)


def test_the_hub_route_reads_what_the_local_route_reads(shards, tmp_path):
    """HubSplit (datasets' streaming, its own shards) on a local folder: the same lanes' windows as
    the local reader when every lane reads whole shards, and every document once per pass when the
    shards are dealt in parts (every n-th document on the hub route, a range of lines locally)."""
    clean = tmp_path / "clean"  # datasets' JSON reader stops at a bad line; the local reader skips it
    clean.mkdir()
    for path in sorted(shards.glob("c4-*.json.gz")):
        if "00001-of" not in path.name:
            (clean / path.name).write_bytes(path.read_bytes())
    hub = streaming.HubSplit("hf:test/local", str(clean), None, "train")
    local = streaming.open_split(str(clean), "train", "train")
    assert hub.n_shards == local.n_shards == 4
    tok = load_tokenizer(TOKENIZER)
    for lanes, mode in ((4, "packed"), (4, "paper")):
        plans = [streaming.Plan(split, lanes, seed=2, repeat=True) for split in (hub, local)]
        readers = [[streaming.Lane(j, plan, tok, 32, mode, [0, 0, 0, 0], Counter()) for j in range(lanes)]
                   for plan in plans]
        for _ in range(30):
            assert all(np.array_equal(a.next_window(), b.next_window()) for a, b in zip(*readers))
    known, seen = documents_by_tokens(32), Counter()
    plan = streaming.Plan(hub, 6, seed=0, repeat=False)
    assert plan.parts == 2
    for lane in range(6):
        reader = streaming.Lane(lane, plan, tok, 32, "paper", [0, 0, 0, 0], Counter())
        with pytest.raises(streaming.LaneExhausted):
            while True:
                window = reader.next_window()
                seen[known[tuple(window[window >= 0].tolist())]] += 1
    skipped = set(range(SHARD_DOCUMENTS[0], sum(SHARD_DOCUMENTS[:2])))  # shard 1's documents
    assert seen == Counter(set(range(sum(SHARD_DOCUMENTS))) - skipped)
    validation = [streaming.HubSplit("hf:test/local", str(clean), None, "validation"),
                  streaming.open_split(str(clean), "validation", "validation")]
    windows = [streaming.validation_windows_from(split, tok, 32, "packed") for split in validation]
    assert all(np.array_equal(next(windows[0])[0], next(windows[1])[0]) for _ in range(50))


def test_a_hub_source_without_a_network_fails_in_one_line(tmp_path):
    values = {**RUN, "data.raw": "hf:allenai/c4/en", "logging.run_dir": tmp_path}
    result = run([sys.executable, "-m", "megatron_lax.train", "--config", "llama_tiny", *as_cli(values)],
                 env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: hf:allenai/c4/en: cannot open split 'train' on the Hugging Face hub (")
    assert "Traceback" not in result.stderr
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
