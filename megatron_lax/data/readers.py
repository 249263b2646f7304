"""Documents out of C4-format shards (.json.gz / .jsonl / .jsonl.gz), other JSON-lines files with a
text field, and plain text (.txt, documents separated by blank lines). Damaged input never raises:
each bad record is skipped and counted by reason, and everything readable is kept. Also the uint8 idx files of (Fashion-)MNIST (read_idx)."""
from __future__ import annotations

import gzip
import itertools
import json
import struct
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np

# no_tokens: text that the tokenizer turns into nothing (counted by data_prep.prepare)
SKIP_REASONS = ("truncated_file", "bad_json", "no_text", "invalid_utf8", "empty", "no_tokens")


def _gzip_chunks(path: Path, skipped: Counter, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """Decompressed bytes of a (possibly multi-member) gzip file. Unlike gzip.open, a truncated or
    corrupt file yields everything decodable before the damage, then counts it as truncated."""
    decompressor, in_member = zlib.decompressobj(wbits=31), False
    with open(path, "rb") as f:
        try:
            while chunk := f.read(chunk_size):
                while chunk:
                    in_member = True
                    yield decompressor.decompress(chunk)
                    chunk = decompressor.unused_data
                    if not decompressor.eof:
                        break
                    decompressor, in_member = zlib.decompressobj(wbits=31), False
        except zlib.error:
            skipped["truncated_file"] += 1
            return
    if in_member:  # the file ended inside a gzip member
        yield decompressor.flush()
        skipped["truncated_file"] += 1


def _plain_chunks(path: Path, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            yield chunk


def _byte_chunks(path: Path, skipped: Counter, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    if path.name.endswith(".gz"):
        return _gzip_chunks(path, skipped, chunk_size)
    return _plain_chunks(path, chunk_size)


def _raw_lines(path: Path, skipped: Counter, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    truncated_before, pending = skipped["truncated_file"], b""
    for data in _byte_chunks(path, skipped, chunk_size):
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line + b"\n"
    if pending and skipped["truncated_file"] == truncated_before:
        yield pending  # a last line without a newline; the cut-off tail of a damaged file is dropped


def count_lines(path: Path) -> int:
    """How many lines _raw_lines yields, counted without splitting them."""
    skipped, newlines, last = Counter(), 0, b"\n"
    for data in _byte_chunks(path, skipped):
        if data:
            newlines, last = newlines + data.count(b"\n"), data[-1:]
    return newlines + (last != b"\n" and not skipped["truncated_file"])


def _json_documents(path: Path, skipped: Counter, text_field: str, part: tuple[int, int],
                    chunk_size: int) -> Iterator[str]:
    k, n = part
    lines = _raw_lines(path, skipped, chunk_size)
    if n > 1:  # the k-th of n contiguous line ranges; the last reads on to the end, and to any damage
        total = count_lines(path)
        lines = itertools.islice(lines, k * total // n, (k + 1) * total // n if k < n - 1 else None)
    for raw in lines:
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
        if usable_text(text, skipped):
            yield text


def usable_text(text, skipped: Counter) -> bool:
    """Whether a record's text is a document; a missing or blank one is counted in `skipped`."""
    if not isinstance(text, str):
        skipped["no_text"] += 1
        return False
    if not text.strip():
        skipped["empty"] += 1
        return False
    return True


def _text_documents(path: Path, skipped: Counter, chunk_size: int) -> Iterator[str]:
    paragraph: list[str] = []
    for raw in _raw_lines(path, skipped, chunk_size):
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


def iter_documents(path: Path, skipped: Counter, text_field: str = "text",
                   part: tuple[int, int] = (0, 1), chunk_size: int = 1 << 20) -> Iterator[str]:
    """Yields the documents of one file, or of its part k of n (JSON lines only); `skipped` counts
    what was dropped, by reason. chunk_size: bytes read at a time (a reader holds a few times that)."""
    path = Path(path)
    if is_text_file(path):
        if part != (0, 1):
            raise ValueError(f"{path}: plain-text files are read whole, not in parts")
        return _text_documents(path, skipped, chunk_size)
    return _json_documents(path, skipped, text_field, part, chunk_size)


def split_of(path: Path) -> str:
    """allenai/c4 names its shards c4-train.* and c4-validation.*; anything else is training data
    unless its name says validation."""
    name = Path(path).name.lower()
    return "validation" if ("validation" in name or name.startswith(("val.", "valid."))) else "train"


def find_idx_file(root, name: str) -> Path:
    """root/name or root/name.gz."""
    for path in (Path(root) / name, Path(root) / f"{name}.gz"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{root}: no {name} or {name}.gz")


def read_idx(path, ndim: int | None = None) -> np.ndarray:
    """A uint8 idx file (LeCun's MNIST format, gzipped or not) as a read-only array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        raw = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a readable idx file ({e})") from None
    if len(raw) < 4 or raw[:3] != b"\0\0\x08" or (ndim is not None and raw[3] != ndim):
        raise ValueError(f"{path}: not a uint8 idx file of {ndim or 'any'} dims (magic {raw[:4].hex() or 'empty'})")
    header = 4 + 4 * raw[3]
    if len(raw) < header:
        raise ValueError(f"{path}: idx header cut short (truncated file)")
    shape = struct.unpack(f">{raw[3]}I", raw[4:header])
    if len(raw) - header != int(np.prod(shape)):
        raise ValueError(f"{path}: {len(raw) - header} data bytes for shape {shape} (truncated or corrupt file)")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)
