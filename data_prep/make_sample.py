"""Rebuild the shipped sample (data/sample/) from the MIT-licensed npm package `nlp-corpus`.

The package holds ~100k English sentences in 100 JSON files (builds/doc-N.json). We group
consecutive sentences into documents and write them in the allenai/c4 layout: gzip'd JSON lines
with `text`, `timestamp` and `url`. Usage:

    npm pack nlp-corpus && tar xzf nlp-corpus-*.tgz
    python -m data_prep.make_sample --package package --output data/sample
"""
import argparse
import gzip
import json
import random
from pathlib import Path

TRAIN_FILES = range(0, 40)
VALID_FILES = range(90, 96)


def documents(package: Path, file_ids, rng: random.Random):
    for i in file_ids:
        sentences = json.loads((package / "builds" / f"doc-{i}.json").read_text())
        start = 0
        while start < len(sentences):
            n = rng.randint(4, 24)
            yield " ".join(s.strip() for s in sentences[start:start + n])
            start += n


def write_shard(path: Path, docs):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for j, text in enumerate(docs):
            record = {"text": text, "timestamp": "2019-04-25T12:57:54Z",
                      "url": f"https://www.npmjs.com/package/nlp-corpus#doc-{j}"}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, required=True, help="extracted nlp-corpus npm package")
    parser.add_argument("--output", type=Path, default=Path("data/sample"))
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    write_shard(args.output / "c4-train.00000-of-00001.json.gz", documents(args.package, TRAIN_FILES, rng))
    write_shard(args.output / "c4-validation.00000-of-00001.json.gz", documents(args.package, VALID_FILES, rng))


if __name__ == "__main__":
    main()
