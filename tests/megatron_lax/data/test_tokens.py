"""The loader: rank partitioning, the epoch's order, exact resume, paper-mode padding, empty and
damaged shards, the tokenizer check, validation set, budgets, vocabulary."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_lax.data.prepare import expand_inputs, prepare, write_manifest, write_shard
from megatron_lax.data import tokens as data
from megatron_lax.config import DataConfig, load_config
from megatron_lax.data.tokens import IGNORE, DataExhausted, Permutation, Sequences, Split, TrainLoader, ensure_prepared, model_vocab_size, resolve_steps, unigram_perplexity, validation_batches
from megatron_lax.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[3]
TOKENIZER = str(REPO / "tokenizer" / "sample")


def rows(batch) -> list[tuple]:
    return [tuple(r.tolist()) for r in batch[0]]


def take(loader, n):
    return [next(loader) for _ in range(n)]


def global_batches(path, mode: str, world: int, micro: int, steps: int) -> list[list[tuple]]:
    """The rows of each step's global batch of 24 sequences, gathered from `world` ranks in rank order."""
    loaders = [TrainLoader(path, 32, mode, 24, micro, rank=r, world_size=world, seed=3) for r in range(world)]
    per_rank = 24 // world // micro
    return [[row for loader in loaders for batch in take(loader, per_rank) for row in rows(batch)]
            for _ in range(steps)]


@pytest.mark.parametrize("mode", ["packed", "paper"])
def test_a_step_sees_the_same_global_batch_on_1_2_3_and_8_ranks(prepared_sample, mode):
    reference = global_batches(prepared_sample, mode, world=1, micro=4, steps=3)  # 6 micro-batches a step
    for world, micro in ((2, 3), (3, 8), (8, 1)):  # 4, 1 and 3 micro-batches a step on each rank
        assert global_batches(prepared_sample, mode, world, micro, steps=3) == reference, world
    assert reference[0] != reference[1]


SIZES = [1, 2, 3, 5, 7, 13, 31, 32, 33, 127, 128, 129, 1021, 1024, 1025, 65_521, 65_536, 65_537, 1_000_003]


def test_the_order_is_a_bijection_for_many_sizes():
    for n in SIZES:  # 1, 2, primes, powers of two and their neighbours
        for key in ((0, 0), (7, 3)):
            assert np.array_equal(np.sort(Permutation(n, *key)(np.arange(n))), np.arange(n)), (n, key)
    with pytest.raises(IndexError):
        Permutation(10, 0)(np.array([10]))


def test_the_order_looks_shuffled():
    n = 100_003
    positions = np.arange(n)
    ids = Permutation(n, 0, 0)(positions)
    assert abs(np.corrcoef(positions, ids)[0, 1]) < 0.02  # no trend (chance: |r| ~ 0.003)
    assert (ids == positions).sum() < 10  # fixed points (chance: ~1)
    assert (np.abs(np.diff(ids)) == 1).mean() < 1e-3  # neighbours are parted
    tenths = np.bincount(ids[:1000] * 10 // n, minlength=10)
    assert tenths.min() > 60 and tenths.max() < 140  # the first batches span the data (chance: 100 +- 9.5)
    assert (Permutation(n, 0, 1)(positions) == ids).mean() < 1e-3  # another epoch, another order
    assert (Permutation(n, 1, 0)(positions) == ids).mean() < 1e-3  # another seed, another order
    for k, orderings in ((3, 6), (4, 24)):  # tiny sizes: every ordering turns up across seeds
        assert len({tuple(Permutation(k, seed, 0)(np.arange(k))) for seed in range(500)}) == orderings
    # The order is what a saved loader state means: the same on every platform and in every version.
    assert Permutation(1000, 7, 0)(np.arange(8)).tolist() == [781, 852, 104, 625, 191, 797, 862, 378]
    assert Permutation(5000, 7, 0)(np.arange(6)).tolist() == [1315, 705, 2794, 1197, 4122, 2028]  # odd bit count


def test_resume_from_state_continues_the_same_stream(prepared_sample):
    reference = TrainLoader(prepared_sample, 32, "packed", 8, 4, seed=1)
    expected = [rows(b) for b in take(reference, 12)]
    first = TrainLoader(prepared_sample, 32, "packed", 8, 4, seed=1)
    seen = [rows(b) for b in take(first, 5)]  # stop mid-step
    resumed = TrainLoader(prepared_sample, 32, "packed", 8, 4, seed=1)
    resumed.load_state_dict(first.state_dict())
    seen += [rows(b) for b in take(resumed, 7)]
    assert seen == expected


def test_resume_onto_another_number_of_ranks_at_a_step_boundary(prepared_sample):
    one = TrainLoader(prepared_sample, 32, "packed", 8, 2, seed=2)
    expected = [row for batch in take(one, 16) for row in rows(batch)][16:]  # steps 2 and 3
    two = [TrainLoader(prepared_sample, 32, "packed", 8, 2, rank=r, world_size=2, seed=2) for r in range(2)]
    for loader in two:
        take(loader, 4)  # two steps
    resumed = TrainLoader(prepared_sample, 32, "packed", 8, 2, seed=2)
    resumed.load_state_dict(two[0].state_dict())
    assert [row for batch in take(resumed, 8) for row in rows(batch)] == expected
    next(two[0])  # now mid-step: a micro-batch index that only means something on 2 ranks
    with pytest.raises(ValueError, match="only at a step boundary"):
        resumed.load_state_dict(two[0].state_dict())
    with pytest.raises(ValueError, match="global batch 8, not 16"):
        TrainLoader(prepared_sample, 32, "packed", 16, 2, seed=2).load_state_dict(one.state_dict())
    with pytest.raises(ValueError, match="not a multiple of micro batch 3 x 2 ranks"):
        TrainLoader(prepared_sample, 32, "packed", 8, 3, world_size=2)


def test_epochs_need_permission_and_reshuffle(prepared_sample):
    loader = TrainLoader(prepared_sample, 256, "paper", 512, 512, seed=0)
    assert loader.steps_per_epoch == 5  # 2893 documents
    first_epoch = take(loader, 5)
    with pytest.raises(DataExhausted):
        next(loader)
    repeating = TrainLoader(prepared_sample, 256, "paper", 512, 512, seed=0, allow_repetition=True)
    take(repeating, 5)
    assert rows(next(repeating)) != rows(first_epoch[0])


def test_resume_mid_step_and_across_an_epoch_in_paper_mode(prepared_sample):
    def loader():  # 5 steps of 4 micro-batches an epoch
        return TrainLoader(prepared_sample, 32, "paper", 512, 128, seed=4, allow_repetition=True)

    expected = [rows(b) for b in take(loader(), 26)]
    first = loader()
    seen = [rows(b) for b in take(first, 18)]  # epoch 0, mid-step
    second = loader()
    second.load_state_dict(first.state_dict())
    seen += [rows(b) for b in take(second, 5)]  # into epoch 1, mid-step
    third = loader()
    third.load_state_dict(second.state_dict())
    seen += [rows(b) for b in take(third, 3)]
    assert seen == expected
    old_state = first.state_dict()
    del old_state["order"]  # what a loader holding the whole permutation in memory saved
    with pytest.raises(ValueError, match="another sequence order"):
        loader().load_state_dict(old_state)


def test_packed_sequences_cover_the_stream_once(prepared_sample):
    split = Split(prepared_sample, "train")
    seqs = Sequences(split, 64, "packed")
    x0, y0 = seqs[0]
    x1, _ = seqs[1]
    assert (y0[:-1] == x0[1:]).all() and y0[-1] == x1[0]  # shifted by one, contiguous across sequences
    assert len(seqs) == (split.n_tokens - 1) // 64


def test_paper_mode_pads_and_masks(prepared_sample):
    split = Split(prepared_sample, "train")
    seqs = Sequences(split, 256, "paper")
    assert len(seqs) == split.n_documents == 2893
    lengths = np.array([split.document_length(d) for d in range(split.n_documents)])
    short = int(np.argmax((lengths > 10) & (lengths < 200)))
    x, y = seqs[short]
    doc = split.document(short, 10_000)
    n = len(doc) - 1
    assert (x[:n] == doc[:-1]).all() and (y[:n] == doc[1:]).all() and y[n - 1] == split.eos_id
    assert (x[n:] == split.pad_id).all() and (y[n:] == IGNORE).all()
    x, y = seqs[int(np.argmax(lengths > 300))]
    assert (y != IGNORE).all()  # truncated to seq_len + 1 tokens: nothing padded


def write_prepared(out: Path, splits: dict) -> Path:
    """A prepared set written straight from token ids, {split: [shard: [document: [ids]]]}, with the
    sample tokenizer's manifest."""
    tok = load_tokenizer(TOKENIZER)
    shards = []
    for split, documents_of_shards in splits.items():
        (out / split).mkdir(parents=True)
        for k, documents in enumerate(documents_of_shards):
            tokens = np.array([t for doc in documents for t in doc], dtype=np.uint16)
            offsets = np.cumsum([0] + [len(doc) for doc in documents], dtype=np.int64)
            source = {"path": f"{split}-{k}", "bytes": 0, "mtime": 0}
            shards.append(write_shard(out / split, f"shard{k}", tokens, offsets, source, tok.hash))
    write_manifest(out, tok, shards)
    return out


def test_a_document_without_targets_is_masked_and_empty_shards_are_skipped(tmp_path):
    eos, pad = 1, 0
    path = write_prepared(tmp_path, {"train": [[[5, 6, eos], [eos]], [], [[7, eos]]]})
    paper = Sequences(Split(path, "train"), 3, "paper")
    assert len(paper) == 3 and [paper.scored_tokens(i) for i in range(3)] == [2, 0, 1]
    assert [a.tolist() for a in paper[1]] == [[pad] * 3, [IGNORE] * 3]  # only EOS: nothing to score
    assert [a.tolist() for a in paper[2]] == [[7, pad, pad], [eos, IGNORE, IGNORE]]  # after the empty shard
    packed = Sequences(Split(path, "train"), 2, "packed")  # the stream 5 6 1 1 7 1
    assert [[a.tolist() for a in packed[i]] for i in range(len(packed))] == [[[5, 6], [6, eos]], [[eos, eos], [eos, 7]]]


def test_reads_are_the_same_when_few_shards_stay_mapped(tmp_path, monkeypatch):
    documents = [[[3 * k + 2, 3 * k + 3, 1], [3 * k + 4, 1]] for k in range(5)]
    path = write_prepared(tmp_path, {"train": documents})
    everything = Split(path, "train")
    monkeypatch.setattr(data, "shards_kept_mapped", lambda n: 1)  # as under a low open-file limit
    one_at_a_time = Split(path, "train")
    picks = np.random.default_rng(0).integers(0, 10, 50)
    assert [everything.document(d, 3).tolist() for d in picks] == [one_at_a_time.document(d, 3).tolist() for d in picks]
    assert everything.tokens(0, 25).tolist() == one_at_a_time.tokens(0, 25).tolist() == sum(sum(documents, []), [])


def test_a_damaged_shard_is_named_in_a_one_line_error(tmp_path):
    path = write_prepared(tmp_path, {"train": [[[5, 6, 1]]]})
    tokens, offsets = path / "train" / "shard0.bin", path / "train" / "shard0.idx.npy"
    tokens.write_bytes(tokens.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"shard0.bin: 4 bytes, but its index ends at token 3; the shard is damaged"):
        Split(path, "train")
    offsets.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"shard0.idx.npy: not a document index"):
        Split(path, "train")
    tokens.unlink()
    with pytest.raises(FileNotFoundError, match=r"shard0.bin: missing; the prepared data is incomplete"):
        Split(path, "train")


def test_parts_without_records_and_a_fully_damaged_file_are_skipped(tmp_path):
    """Four workers cut each file in two: the one-line validation file leaves an empty part, and the
    damaged file two; the loader and the validation set read around them."""
    raw = tmp_path / "raw"
    raw.mkdir()
    words = " ".join(f"word{i}" for i in range(60))
    two_lines = "".join(json.dumps({"text": f"{k} {words}"}) + "\n" for k in range(2))
    (raw / "c4-train.00000-of-00002.jsonl").write_text(two_lines)
    (raw / "c4-train.00001-of-00002.json.gz").write_bytes(gzip.compress(b"x" * 1000)[:20] + b"\xff" * 100)
    (raw / "c4-validation.00000-of-00001.jsonl").write_text(json.dumps({"text": words}) + "\n")
    out = tmp_path / "out"
    manifest = prepare(sorted(raw.iterdir()), TOKENIZER, out, workers=4, progress=False)
    assert len(manifest["splits"]["train"]["shards"]) == 4 and len(manifest["splits"]["validation"]["shards"]) == 2
    assert manifest["skipped"]["truncated_file"] == 1
    tok = load_tokenizer(TOKENIZER)
    documents = [tok.encode(f"{k} {words}") + [tok.eos_id] for k in range(2)]
    assert Split(out, "train").tokens(0, manifest["splits"]["train"]["tokens"]).tolist() == sum(documents, [])
    paper = TrainLoader(out, 16, "paper", 2, 2)
    assert sorted(rows(next(paper))) == sorted(tuple(doc[:16]) for doc in documents)
    packed = TrainLoader(out, 16, "packed", 2, 1)
    assert len(take(packed, 2 * packed.steps_per_epoch)) == 2 * packed.steps_per_epoch
    batches = [len(validation_batches(out, 16, 4, 100, mode)) for mode in ("packed", "paper")]
    assert batches == [2, 1]  # 7 windows of 16; 1 document
    assert unigram_perplexity(out, 16, "paper", 100) > 1


def test_prepared_data_of_another_tokenizer_is_refused(prepared_sample, tmp_path):
    english = str(REPO / "tokenizer" / "english")
    with pytest.raises(ValueError) as refused:
        ensure_prepared(DataConfig(path=str(prepared_sample), tokenizer=english))
    message = str(refused.value)
    assert "\n" not in message and f"prepared with tokenizer {TOKENIZER} (hash" in message
    assert f"data.tokenizer is {english} (hash" in message
    same = tmp_path / "copy"
    shutil.copytree(TOKENIZER, same)  # the same tokenizer elsewhere is the same tokenizer
    assert ensure_prepared(DataConfig(path=str(prepared_sample), tokenizer=str(same))) == prepared_sample


@pytest.mark.parametrize("mode", ["packed", "paper"])
def test_validation_set_is_fixed_across_batch_sizes_and_ranks(prepared_sample, mode):
    def all_targets(micro, world):
        batches = [b for r in range(world) for b in validation_batches(prepared_sample, 64, micro, 5000, mode, r, world)]
        ys = torch.cat([y for _, y in batches])
        scored_rows = [tuple(row.tolist()) for row in ys if (row != IGNORE).any()]
        return sorted(scored_rows), int((ys != IGNORE).sum())  # rows a rank pads with score nothing

    reference, scored = all_targets(4, 1)
    assert scored >= 5000 and all_targets(3, 2) == (reference, scored) and all_targets(8, 3) == (reference, scored)


def test_vocabulary_follows_the_tokenizer_or_must_hold_it():
    manifest = {"tokenizer": {"vocab_size": 32100}}
    assert model_vocab_size(manifest, 0) == 32128
    assert model_vocab_size(manifest, 32128) == 32128
    with pytest.raises(ValueError, match="the tokenizer has 32100 entries but model.vocab_size is 32000"):
        model_vocab_size(manifest, 32000)


def test_token_budgets():
    for preset, steps in (("llama_60m", 10_000), ("llama_130m", 20_000), ("llama_350m", 60_000), ("llama_1b", 100_000)):
        paper = load_config(preset, {"train.token_budget": "paper", "train.steps": "1"})
        assert resolve_steps(paper.train, paper.model, 256, 2e10, 58e6) == steps  # Table 14, exactly
    cfg = load_config("llama_60m", {"train.token_budget": "paper"})
    cfg.train.token_budget = "chinchilla"
    assert resolve_steps(cfg.train, cfg.model, 256, 2e9, 58e6) == 8851  # ceil(20 x 58M / (512 x 256))
    cfg.train.token_budget = "500M"
    with pytest.raises(ValueError, match=r"needs 500,039,680 tokens .* holds 1,000,000"):
        resolve_steps(cfg.train, cfg.model, 256, 1_000_000, 58e6)
    cfg.train.allow_repetition = True
    assert resolve_steps(cfg.train, cfg.model, 256, 1_000_000, 58e6) == 3815
    cfg.train.token_budget = "1.5e9"
    assert resolve_steps(cfg.train, cfg.model, 256, 2e9, 58e6) == 11445  # ceil(1.5e9 / 131072)
    cfg.train.token_budget, cfg.train.steps = "0", 7
    assert resolve_steps(cfg.train, cfg.model, 256, 2e9, 58e6) == 7
    tiny = load_config("llama_tiny", {"train.token_budget": "paper"})
    with pytest.raises(ValueError, match="not dim 256"):
        resolve_steps(tiny.train, tiny.model, 256, 2e9, 5e6)
    cfg.train.token_budget = "lots"
    with pytest.raises(ValueError, match="not paper, chinchilla or a number"):
        resolve_steps(cfg.train, cfg.model, 256, 1e9, 58e6)


def test_a_mistyped_data_path_is_an_error_not_the_sample_corpus(tmp_path):
    typo = tmp_path / "prepared" / "c4_typo"
    with pytest.raises(FileNotFoundError) as error:
        ensure_prepared(DataConfig(path=str(typo)))
    assert str(error.value) == (f"data.path {typo} holds no prepared data; to prepare it, set data.raw to the raw text "
                                f"(data.raw is the default data/sample, the shipped sample corpus, which is prepared "
                                f"only into the default data.path data/prepared/sample)")
    assert not typo.exists()


def test_a_second_process_waits_for_the_preparation_under_way_and_reuses_it(tmp_path):
    """Runs started side by side on data nobody has prepared yet (a study's bases): the second one waits
    for the first one's preparation and reads it, instead of writing the same shards at the same time."""
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[3]
    cfg = DataConfig(path=str(tmp_path / "prepared" / "sample"), raw=str(repo / "data" / "sample"),
                     tokenizer=str(repo / "tokenizer" / "sample"))
    second = [sys.executable, "-c", "import sys; from megatron_lax.config import DataConfig; "
              "from megatron_lax.data.tokens import ensure_prepared; "
              "ensure_prepared(DataConfig(path=sys.argv[1], raw=sys.argv[2], tokenizer=sys.argv[3]))",
              cfg.path, cfg.raw, cfg.tokenizer]
    with data.preparing(Path(cfg.path)):
        process = subprocess.Popen(second, cwd=repo)
        time.sleep(3)
        assert process.poll() is None and not Path(cfg.path).exists()  # waiting, writing nothing
        prepare(expand_inputs(cfg.raw), cfg.tokenizer, Path(cfg.path), 1, progress=False)
        written = (Path(cfg.path) / "manifest.json").stat().st_mtime_ns
    assert process.wait(timeout=120) == 0
    assert (Path(cfg.path) / "manifest.json").stat().st_mtime_ns == written  # read, not prepared again
