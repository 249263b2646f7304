"""Documents out of C4-format shards (.json.gz / .jsonl / .jsonl.gz), other JSON-lines files with a
text field, and plain text (.txt, documents separated by blank lines). Damaged input never raises:
each bad record is skipped and counted by reason, and everything readable is kept."""
from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterator

SKIP_REASONS = ("truncated_file", "bad_json", "no_text", "invalid_utf8", "empty")


def _raw_lines(path: Path, skipped: Counter) -> Iterator[bytes]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            yield from f
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError):
        skipped["truncated_file"] += 1  # everything decoded before the damage was yielded


def _json_documents(path: Path, skipped: Counter, text_field: str) -> Iterator[str]:
    for raw in _raw_lines(path, skipped):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped["invalid_utf8"] += 1
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped["bad_json"] += 1
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            skipped["no_text"] += 1
        elif not text.strip():
            skipped["empty"] += 1
        else:
            yield text


def _text_documents(path: Path, skipped: Counter) -> Iterator[str]:
    paragraph: list[str] = []
    for raw in _raw_lines(path, skipped):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped["invalid_utf8"] += 1
            continue
        if line.strip():
            paragraph.append(line.rstrip("\n"))
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def is_text_file(path: Path) -> bool:
    return path.name.endswith((".txt", ".txt.gz"))


def iter_documents(path: Path, skipped: Counter, text_field: str = "text") -> Iterator[str]:
    """Yields the documents of one file; `skipped` counts what was dropped, by reason."""
    path = Path(path)
    if is_text_file(path):
        return _text_documents(path, skipped)
    return _json_documents(path, skipped, text_field)


def split_of(path: Path) -> str:
    """allenai/c4 names its shards c4-train.* and c4-validation.*; anything else is training data
    unless its name says validation."""
    name = Path(path).name.lower()
    return "validation" if ("validation" in name or name.startswith(("val.", "valid."))) else "train"
