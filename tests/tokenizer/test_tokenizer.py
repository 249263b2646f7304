"""Tokenizer training and the one loader."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lax.data.tokenizer import load_tokenizer
from megatron_lax.data.train_tokenizer import sample_documents, train_tokenizer
from megatron_lax.train import make_trainer

REPO = Path(__file__).resolve().parents[2]
SAMPLE_TRAIN = REPO / "data" / "sample" / "c4-train.00000-of-00001.json.gz"


def test_trained_tokenizer_is_t5_style(tmp_path):
    train_tokenizer([SAMPLE_TRAIN], 1000, tmp_path / "tok", max_documents=300)
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (1000, 0, 1)
    ids = tok.encode("Room 1234 costs   €5")
    digits = [tok.backend.id_to_piece(i) for i in tok.encode("1234")]
    assert all(len(p.strip("▁")) <= 1 for p in digits)  # digits are split
    assert tok.decode(ids) == "Room 1234 costs €5"  # whitespace normalised, byte fallback keeps €
    same_file = load_tokenizer(str(tmp_path / "tok" / "tokenizer.model"))
    assert same_file.hash == tok.hash and same_file.encode("hello") == tok.encode("hello")


def test_sampling_is_capped_and_uniform_over_the_input():
    sample, seen = sample_documents([SAMPLE_TRAIN], 100, seed=0)
    assert len(sample) == 100 and seen == 2893
    texts = [json.loads(line)["text"] for line in gzip.open(SAMPLE_TRAIN, "rt")]
    positions = sorted(texts.index(t) for t in sample)
    assert positions[0] < 500 and positions[-1] > 2400  # drawn from the whole file, not its head


def test_huggingface_directory_and_clear_errors(tmp_path):
    """A directory laid out like a local copy of t5-base (spiece.model + tokenizer_config.json)."""
    pytest.importorskip("transformers")
    (tmp_path / "hf").mkdir()
    shutil.copy(REPO / "tokenizer" / "sample" / "tokenizer.model", tmp_path / "hf" / "spiece.model")
    (tmp_path / "hf" / "tokenizer_config.json").write_text('{"tokenizer_class": "T5Tokenizer", "extra_ids": 0}')
    tok = load_tokenizer(str(tmp_path / "hf"))
    assert tok.kind == "huggingface" and tok.eos_id == 1 and tok.vocab_size == 8192
    assert tok.decode(tok.encode("A short sentence.")) == "A short sentence."
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither tokenizer.model nor"):
        load_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="x.model: no such file or directory"):
        load_tokenizer(str(tmp_path / "missing" / "x.model"))
    (tmp_path / "notes.txt").write_text("not a tokenizer")
    with pytest.raises(ValueError, match="not a .model file or a tokenizer directory"):
        load_tokenizer(str(tmp_path / "notes.txt"))


def test_hub_name_without_a_hub_is_one_clear_line():
    """HF_HUB_OFFLINE makes the failure immediate; an unreachable hub gives the same line after retries."""
    pytest.importorskip("transformers")
    result = subprocess.run([sys.executable, "-m", "data_prep.prepare", "--input", str(SAMPLE_TRAIN), "--tokenizer",
                             "hf:megatron-lax/not-cached", "--output", "unused"], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert result.stderr.startswith("error: tokenizer hf:megatron-lax/not-cached: could not load it from the Hugging "
                                    "Face hub")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("spec", ["tokenizer/englsh", "englsh", "t5-base", "megatron-lax/not-cached"])
def test_a_spec_without_hf_is_a_local_path_and_never_reaches_the_hub(spec, monkeypatch):
    from megatron_lax.data import tokenizer

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")
    monkeypatch.setattr(tokenizer, "_huggingface", no_hub)
    with pytest.raises(ValueError) as error:
        load_tokenizer(spec)
    assert str(error.value) == (f"tokenizer {spec}: no such file or directory (a Hugging Face hub tokenizer is "
                                f"written hf:NAME, e.g. hf:t5-base)")


def test_remote_code_is_never_run(tmp_path):
    """A tokenizer directory whose config asks for its own Python class is refused, and the code not run."""
    pytest.importorskip("transformers")
    marker = tmp_path / "marker"
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}, "tokenizer_class": "EvilTokenizer"}))
    (tmp_path / "tok" / "evil.py").write_text(f"import os\nos.mkdir({str(marker)!r})\n")
    with pytest.raises(ValueError, match="could not load it from the local directory"):
        load_tokenizer(str(tmp_path / "tok"))
    assert not marker.exists()


def t5_layout_directory(path: Path) -> Path:
    """Laid out as a local copy of t5-base: spiece.model plus 100 sentinel ids after its pieces."""
    path.mkdir()
    shutil.copy(REPO / "tokenizer" / "sample" / "tokenizer.model", path / "spiece.model")
    (path / "tokenizer_config.json").write_text('{"tokenizer_class": "T5Tokenizer", "extra_ids": 100}')
    return path


def test_t5_layout_tokenizer_works_with_every_preset(tmp_path):
    """t5-base has 32,000 pieces + 100 sentinels = 32,100 entries: the presets do not pin the
    vocabulary, so the embedding follows the tokenizer, rounded up to a multiple of 64, while `info`
    keeps counting Table 5's 32,000."""
    pytest.importorskip("transformers")
    from conftest import TINY
    from megatron_lax.config import PRESETS, load_config
    from megatron_lax.data.tokens import model_vocab_size
    from megatron_lax.info import describe

    tok = load_tokenizer(str(t5_layout_directory(tmp_path / "t5")))
    assert tok.vocab_size == 8192 + 100 and tok.eos_id == 1
    for preset in PRESETS:
        assert model_vocab_size({"tokenizer": {"vocab_size": 32100}}, load_config(preset).model.vocab_size) == 32128
    row = describe(load_config("llama_60m", {"model.method": "svd"}))
    assert (row["vocab_size"], row["params"]) == (32000, 42_770_944) and "32,000" in row["vocab_source"]

    overrides = {**TINY, "data.path": str(tmp_path / "prepared"), "data.tokenizer": str(tmp_path / "t5"),
                 "data.raw": str(REPO / "data" / "sample"), "logging.run_dir": str(tmp_path / "run"),
                 "train.steps": "2", "model.method": "svd", "model.lax_gate": "identity"}
    summary = make_trainer(load_config("llama_tiny", overrides)).fit()
    run_cfg = load_config(str(tmp_path / "run" / "config.yaml"))
    assert run_cfg.model.vocab_size == 8320 and summary["steps"] == 2


def test_a_malformed_tokenizer_config_is_one_line_naming_the_tokenizer(tmp_path, capsys):
    pytest.importorskip("transformers")
    from megatron_lax.data.prepare import main
    tok = t5_layout_directory(tmp_path / "tok")
    (tok / "tokenizer_config.json").write_text('{"tokenizer_class": 5}')
    assert main(["--input", str(REPO / "data" / "sample"), "--tokenizer", str(tok), "--output",
                 str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: tokenizer {tok}: could not load it from the local directory: a malformed tokenizer_config.json or "
        f"tokenizer.json (AttributeError: 'int' object has no attribute 'removesuffix')"]
