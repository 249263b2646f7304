"""Preprocessing: exact counts, damaged input skipped and counted, valid records kept, idempotent re-runs."""
from __future__ import annotations

import gzip
import json
import random
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_lax.data.prepare import prepare
from megatron_lax.data.readers import SKIP_REASONS
from megatron_lax.data.tokens import Split

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample"
TOKENIZER = str(REPO / "tokenizer" / "sample")


def record(text) -> bytes:
    return (json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": "https://example.org"}) + "\n").encode()


def make_damaged_inputs(directory: Path) -> dict:
    """One file per kind of damage, plus the texts of the valid records each holds."""
    good = [f"Valid document number {i} with some words in it." for i in range(6)]
    lines = [record(good[0]), b"{not json at all\n", record(good[1]), json.dumps({"url": "x"}).encode() + b"\n",
             record(good[2]), b'{"text": "bad \xff\xfe bytes"}\n', record("   "), record(good[3]),
             record("\u200b\u200b")]  # zero-width spaces: text, but no token
    with gzip.open(directory / "c4-train.00000-of-00002.json.gz", "wb") as f:
        f.writelines(lines)
    incompressible = random.Random(0).choices(string.ascii_letters, k=20000)
    whole = gzip.compress(b"".join(record(t) for t in good[4:]) + record("".join(incompressible)))
    (directory / "c4-train.00001-of-00002.json.gz").write_bytes(whole[: len(whole) - 200])  # truncated gzip
    with gzip.open(directory / "c4-validation.00000-of-00001.json.gz", "wb") as f:
        f.write(record("A validation document."))
    return {"valid": good, "skipped": {"bad_json": 1, "no_text": 1, "invalid_utf8": 1, "empty": 1,
                                       "truncated_file": 1, "no_tokens": 1}}


def documents_of(output: Path, split: str, shard: str) -> list[np.ndarray]:
    tokens = np.fromfile(output / split / f"{shard}.bin", dtype=np.uint16)
    offsets = np.load(output / split / f"{shard}.idx.npy")
    return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def test_damaged_shards_are_skipped_counted_and_valid_records_kept(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    expected = make_damaged_inputs(raw)
    manifest = prepare(sorted(raw.iterdir()), TOKENIZER, tmp_path / "out", workers=2, progress=False)
    assert manifest["skipped"] == {reason: expected["skipped"].get(reason, 0) for reason in SKIP_REASONS}
    assert manifest["splits"]["train"]["skipped"] == manifest["skipped"]
    assert manifest["splits"]["train"]["documents"] == len(expected["valid"])
    from megatron_lax.data.tokenizer import load_tokenizer
    tok = load_tokenizer(TOKENIZER)
    decoded = [tok.decode(d[:-1]) for shard in ("c4-train.00000-of-00002", "c4-train.00001-of-00002")
               for d in documents_of(tmp_path / "out", "train", shard)]
    assert decoded[:4] == expected["valid"][:4]
    assert set(expected["valid"]) <= set(decoded)  # the truncated file's readable records survive
    assert manifest["splits"]["validation"]["documents"] == 1
    assert not list((tmp_path / "out").rglob("*.tmp*"))


def test_sample_counts_round_trip_and_idempotent_rerun(tmp_path):
    out = tmp_path / "out"
    first = prepare(sorted(SAMPLE.glob("*.json.gz")), TOKENIZER, out, workers=2, progress=False)
    texts = [json.loads(line)["text"] for line in gzip.open(SAMPLE / "c4-train.00000-of-00001.json.gz", "rt")]
    assert first["splits"]["train"]["documents"] == len(texts) == 2893
    docs = documents_of(out, "train", "c4-train.00000-of-00001")
    assert sum(len(d) for d in docs) == first["splits"]["train"]["tokens"]
    assert all(d[-1] == first["tokenizer"]["eos_id"] for d in docs)
    from megatron_lax.data.tokenizer import load_tokenizer
    tok = load_tokenizer(TOKENIZER)
    for i in (0, 17, 2892):  # token-level round trip, modulo whitespace normalisation
        assert " ".join(tok.decode(docs[i][:-1]).split()) == " ".join(texts[i].split())
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    second = prepare(sorted(SAMPLE.glob("*.json.gz")), TOKENIZER, out, workers=1, progress=False)
    assert second == first
    assert files == {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}


def test_one_file_is_cut_into_parts_for_every_worker(tmp_path):
    """Parts keep the documents' order, so the prepared stream does not depend on --workers, and a
    re-run with another number of workers reuses the parts."""
    damaged = tmp_path / "raw"
    damaged.mkdir()
    make_damaged_inputs(damaged)  # the truncated file: its damage must be counted once, not per part
    inputs = [SAMPLE / "c4-validation.00000-of-00001.json.gz", damaged / "c4-train.00001-of-00002.json.gz"]
    whole = prepare(inputs, TOKENIZER, tmp_path / "one", workers=1, progress=False)
    parts = prepare(inputs, TOKENIZER, tmp_path / "three", workers=5, progress=False)
    assert parts["splits"]["validation"]["shards"] == [f"c4-validation.00000-of-00001.part{k:04d}-of-0003" for k in range(3)]
    for split in ("train", "validation"):
        assert {k: v for k, v in parts["splits"][split].items() if k != "shards"} == \
            {k: v for k, v in whole["splits"][split].items() if k != "shards"}
        stream = [np.fromfile(tmp_path / d / split / f"{name}.bin", dtype=np.uint16)
                  for d, m in (("one", whole), ("three", parts)) for name in m["splits"][split]["shards"]]
        assert np.array_equal(stream[0], np.concatenate(stream[1:]))
    assert parts["inputs"] == whole["inputs"]
    again = prepare(inputs, TOKENIZER, tmp_path / "three", workers=1, progress=False)
    assert again == parts


def test_more_inputs_or_another_split_extend_the_manifest(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    for name, n in (("a-train", 3), ("b-validation", 1), ("c-train", 2)):
        (raw / f"{name}.jsonl").write_bytes(b"".join(record(f"{name} document {i}") for i in range(n)))
    prepare([raw / "a-train.jsonl"], TOKENIZER, out, progress=False)
    first = {p: p.read_bytes() for p in (out / "train").iterdir()}
    prepare([raw / "b-validation.jsonl"], TOKENIZER, out, progress=False)  # another split
    manifest = prepare([raw / "c-train.jsonl"], TOKENIZER, out, progress=False)  # more inputs
    assert manifest["splits"]["train"]["shards"] == ["a-train", "c-train"]
    assert manifest["splits"]["validation"]["shards"] == ["b-validation"]
    assert (manifest["splits"]["train"]["documents"], manifest["splits"]["validation"]["documents"]) == (5, 1)
    inputs = sorted(Path(i["path"]).name for i in manifest["inputs"])
    assert inputs == ["a-train.jsonl", "b-validation.jsonl", "c-train.jsonl"]
    assert all(p.read_bytes() == data for p, data in first.items()) and Split(out, "train").n_documents == 5
    assert prepare([raw / "a-train.jsonl"], TOKENIZER, out, progress=False) == manifest  # a re-run keeps the rest
    (out / "train" / "c-train.bin").unlink()  # a listed shard lost: dropped, said so
    capsys.readouterr()
    manifest = prepare([raw / "b-validation.jsonl"], TOKENIZER, out, progress=False)
    assert manifest["splits"]["train"]["shards"] == ["a-train"] and "1 listed shard(s)" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"holds data prepared with tokenizer .*sample \(hash \w+\), not .*english"):
        prepare([raw / "c-train.jsonl"], str(REPO / "tokenizer" / "english"), out, progress=False)


def test_incomplete_shard_is_redone(tmp_path):
    out = tmp_path / "out"
    prepare([SAMPLE / "c4-validation.00000-of-00001.json.gz"], TOKENIZER, out, progress=False)
    meta = out / "validation" / "c4-validation.00000-of-00001.json"
    meta.unlink()  # as if the worker died before finishing
    (out / "validation" / "c4-validation.00000-of-00001.bin").write_bytes(b"garbage")
    manifest = prepare([SAMPLE / "c4-validation.00000-of-00001.json.gz"], TOKENIZER, out, progress=False)
    assert meta.is_file() and manifest["splits"]["validation"]["documents"] == 424
    assert (out / "validation" / "c4-validation.00000-of-00001.bin").stat().st_size == 2 * manifest["splits"]["validation"]["tokens"]


def test_cli_plain_text_and_missing_input(tmp_path):
    (tmp_path / "notes.txt").write_text("First paragraph.\nStill first.\n\nSecond paragraph.\n")
    ok = subprocess.run([sys.executable, "-m", "data_prep.prepare", "--input", str(tmp_path / "*.txt"), "--tokenizer",
                         TOKENIZER, "--output", str(tmp_path / "out"), "--workers", "1", "--no-progress"],
                        capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]["train"]["documents"] == 2
    missing = subprocess.run([sys.executable, "-m", "data_prep.prepare", "--input", str(tmp_path / "nothing*.gz"),
                              "--tokenizer", TOKENIZER, "--output", str(tmp_path / "o2")],
                             capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 2 and missing.stderr.strip() == (
        f"error: --input {tmp_path / 'nothing*.gz'}: no such file, and no file matches it (a hub dataset is written "
        f"hf:OWNER/NAME)")


def test_parts_cover_every_line_once_and_are_balanced(tmp_path):
    from collections import Counter

    from megatron_lax.data.readers import _raw_lines, count_lines, iter_documents
    texts = [f"document {i}" for i in range(10)]
    (tmp_path / "no-final-newline.jsonl").write_bytes(b"".join(record(t) for t in texts).rstrip(b"\n"))
    (tmp_path / "final-newline.jsonl.gz").write_bytes(gzip.compress(b"".join(record(t) for t in texts)))
    for path in tmp_path.iterdir():
        assert count_lines(path) == len(list(_raw_lines(path, Counter()))) == 10
        for n in (1, 3, 7, 12):
            parts = [list(iter_documents(path, Counter(), part=(k, n))) for k in range(n)]
            assert sum(parts, []) == texts, (path.name, n)
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    make_damaged_inputs(damaged)
    for path in damaged.iterdir():
        assert count_lines(path) == len(list(_raw_lines(path, Counter())))


def test_an_output_that_contains_an_input_is_refused_and_the_input_kept(tmp_path, capsys):
    from megatron_lax.data.prepare import main
    raw = tmp_path / "train"  # --output is the raw folder's parent; shards of the train split go to OUTPUT/train
    raw.mkdir()
    source = raw / "c4-train.json"  # uncompressed: its shard's metadata would be OUTPUT/train/c4-train.json
    source.write_bytes(record("A document.") + record("Another one."))
    assert main(["--input", str(raw), "--tokenizer", TOKENIZER, "--output", str(tmp_path), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --output {tmp_path} contains the input {source}: preparing there could write over it; choose an "
        f"output directory that holds no input"]
    assert source.read_bytes() == record("A document.") + record("Another one.")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["c4-train.json", "train"]


def test_two_inputs_with_one_stem_are_refused_before_anything_is_written(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "notes-train.json").write_bytes(record("A document."))
    (raw / "notes-train.jsonl").write_bytes(record("Another document."))
    with pytest.raises(ValueError, match=r"notes-train.json and .*notes-train.jsonl would both be written as the "
                                         r"shard train/notes-train; rename one of them"):
        prepare(sorted(raw.iterdir()), TOKENIZER, tmp_path / "out", progress=False)
    assert sorted(p.name for p in raw.iterdir()) == ["notes-train.json", "notes-train.jsonl"]
    assert not (tmp_path / "out").exists()


def test_inputs_in_the_hub_download_folder_of_the_output_are_prepared(tmp_path):
    raw = tmp_path / "out" / "raw"  # where --input NAME/ON/HUB streams to
    raw.mkdir(parents=True)
    (raw / "c4-train.json").write_bytes(record("A document about the hub."))
    manifest = prepare([raw / "c4-train.json"], TOKENIZER, tmp_path / "out", progress=False)
    assert manifest["splits"]["train"]["documents"] == 1 and (raw / "c4-train.json").read_bytes() == \
        record("A document about the hub.")


def test_a_mistyped_local_path_is_not_taken_for_a_hub_dataset(tmp_path, capsys, monkeypatch):
    from megatron_lax.data import prepare as prepare_module
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prepare_module, "stream_hub_dataset", lambda *a, **k: pytest.fail("asked the hub"))
    assert prepare_module.main(["--input", "data/smaple", "--tokenizer", "tokenizer/sample",
                                "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --input data/smaple: no such file, and no file matches it (a hub dataset is written hf:OWNER/NAME)"]
    assert not (tmp_path / "out").exists()
