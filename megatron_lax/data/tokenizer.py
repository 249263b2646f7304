"""One loader for every tokenizer the trainer and the preprocessing accept:

- a directory written by `python -m tokenizer.train` (holds tokenizer.model),
- any local SentencePiece `.model` file,
- any local Hugging Face tokenizer directory (e.g. a copy of t5-base),
- a Hugging Face hub name, written hf:NAME (hf:t5-base), when the hub is reachable.

A spec without the hf: prefix is a local path and nothing else: a mistyped path is an error, never a
hub lookup that could fetch some other tokenizer. Remote code is never run (trust_remote_code off).
"""
from __future__ import annotations

import hashlib
import os
import socket
import urllib.parse
import tempfile
from pathlib import Path


class Tokenizer:
    """encode/decode plus the ids and the content hash that a data manifest records."""

    def __init__(self, kind: str, backend, files: list[Path], name: str):
        self.kind, self.backend, self.name = kind, backend, name
        self.hash = _content_hash(files)
        if kind == "sentencepiece":
            sp = backend
            self.vocab_size = sp.get_piece_size()
            self.bos_id, self.eos_id, self.pad_id = sp.bos_id(), sp.eos_id(), sp.pad_id()
        else:
            tok = backend
            self.vocab_size = len(tok)
            self.bos_id = tok.bos_token_id if tok.bos_token_id is not None else -1
            self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else -1
            self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else -1
        if self.eos_id < 0:
            raise ValueError(f"tokenizer {name} has no end-of-sequence token")

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "sentencepiece":  # one thread: preprocessing parallelises over processes
            return self.backend.encode(texts, num_threads=1)
        return self.backend(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=True)

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id, "hash": self.hash}


def _content_hash(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _sentencepiece(model_file: Path, name: str) -> Tokenizer:
    import sentencepiece as spm
    return Tokenizer("sentencepiece", spm.SentencePieceProcessor(model_file=str(model_file)), [model_file], name)


# The files that define a Hugging Face tokenizer; a model directory's weights are not hashed.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "spiece.model", "tokenizer.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt",
                      "merges.txt")


def _huggingface(source: str, name: str, local: bool) -> Tokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError(f"tokenizer {name}: loading Hugging Face tokenizers needs `pip install transformers`") from None
    if not local:
        try:
            check_hub_reachable()
        except ValueError as e:
            raise ValueError(f"tokenizer {name}: {e}") from None
    try:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=local, trust_remote_code=False)
    except (OSError, ValueError, AttributeError, TypeError, KeyError) as e:  # the last three: a malformed config
        where = "the local directory" if local else "the Hugging Face hub (is it reachable?)"
        reason = (str(e).strip().splitlines() or [""])[0]
        if not isinstance(e, (OSError, ValueError)):
            reason = f"a malformed tokenizer_config.json or tokenizer.json ({type(e).__name__}: {reason})"
        raise ValueError(f"tokenizer {name}: could not load it from {where}: {reason}") from None
    with tempfile.TemporaryDirectory() as tmp:  # hash the files as saved: the same for a local copy and the hub
        tok.save_pretrained(tmp)
        files = [p for p in Path(tmp).iterdir() if p.name in HF_TOKENIZER_FILES and p.name != "tokenizer_config.json"]
        return Tokenizer("huggingface", tok, files, name)


HUB_PREFIX = "hf:"
HUB_HOST, PROBE_SECONDS = "huggingface.co", 3.0


def check_hub_reachable() -> None:
    """ValueError in a few seconds when the hub cannot be reached (no TCP connection to it, or to
    HF_ENDPOINT, within PROBE_SECONDS), instead of the hub client's retries over a minute. With
    HF_HUB_OFFLINE set the client reads its cache, and fails at once by itself."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or f"https://{HUB_HOST}")
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname, port), timeout=PROBE_SECONDS).close()
    except OSError as e:
        raise ValueError(f"the Hugging Face hub ({url.hostname}:{port}) cannot be reached in {PROBE_SECONDS:.0f} s "
                         f"({type(e).__name__}); use a local copy, or set HF_HUB_OFFLINE=1 to use the hub's cache") \
            from None


def load_tokenizer(spec: str) -> Tokenizer:
    if spec.startswith(HUB_PREFIX):
        return _huggingface(spec[len(HUB_PREFIX):], spec, local=False)
    path = Path(spec)
    if path.is_file() and path.suffix == ".model":
        return _sentencepiece(path, spec)
    if path.is_dir():
        if (path / "tokenizer.model").is_file() and not (path / "tokenizer_config.json").is_file():
            return _sentencepiece(path / "tokenizer.model", spec)
        if any((path / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json", "spiece.model")):
            return _huggingface(str(path), spec, local=True)
        raise ValueError(f"tokenizer {spec}: directory holds neither tokenizer.model nor a Hugging Face tokenizer")
    if path.exists():
        raise ValueError(f"tokenizer {spec}: not a .model file or a tokenizer directory")
    raise ValueError(f"tokenizer {spec}: no such file or directory (a Hugging Face hub tokenizer is written "
                     f"{HUB_PREFIX}NAME, e.g. {HUB_PREFIX}t5-base)")


__all__ = ["HUB_PREFIX", "Tokenizer", "check_hub_reachable", "load_tokenizer"]
