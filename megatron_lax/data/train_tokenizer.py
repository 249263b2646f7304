"""Train a SentencePiece unigram tokenizer, T5-style (byte fallback, digits split, whitespace
normalised), on a uniform sample of documents:

    python -m tokenizer.train --input 'data/c4/c4-train.*.json.gz' --vocab-size 32000 --output DIR

Reservoir sampling keeps at most --max-documents documents in memory however large the input.
Ids: pad 0, eos 1, unk 2, bos 3.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import random
import sys
from collections import Counter
from pathlib import Path

from .readers import iter_documents


def sample_documents(paths: list[Path], max_documents: int, seed: int = 0) -> tuple[list[str], int]:
    """A uniform sample (reservoir) of at most max_documents documents, and how many were seen."""
    rng, reservoir, seen = random.Random(seed), [], 0
    skipped: Counter = Counter()
    for path in paths:
        for text in iter_documents(path, skipped):
            seen += 1
            if len(reservoir) < max_documents:
                reservoir.append(text)
            else:
                j = rng.randrange(seen)
                if j < max_documents:
                    reservoir[j] = text
    return reservoir, seen


def train_tokenizer(paths: list[Path], vocab_size: int, output: Path, max_documents: int = 200_000,
                    max_sentence_length: int = 16384, seed: int = 0) -> Path:
    import sentencepiece as spm

    documents, seen = sample_documents(paths, max_documents, seed)
    if not documents:
        raise ValueError("no documents found in the input")
    output.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(documents), model_writer=model, model_type="unigram", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
        remove_extra_whitespaces=True, pad_id=0, eos_id=1, unk_id=2, bos_id=3,
        max_sentence_length=max_sentence_length, input_sentence_size=0, train_extremely_large_corpus=False,
        num_threads=2, minloglevel=2)
    (output / "tokenizer.model").write_bytes(model.getvalue())
    info = {"vocab_size": vocab_size, "model_type": "unigram", "documents_sampled": len(documents),
            "documents_seen": seen, "inputs": [str(p) for p in paths]}
    (output / "training.json").write_text(json.dumps(info, indent=1))
    return output / "tokenizer.model"


def expand_inputs(patterns: list[str]) -> list[Path]:
    paths = sorted({Path(p) for pattern in patterns for p in (glob.glob(pattern) or [pattern])})
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"input not found: {', '.join(missing)}")
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenizer.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="files or globs (C4 .json.gz, .jsonl, .txt)")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--max-documents", type=int, default=200_000, help="cap on sampled documents")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        model = train_tokenizer(expand_inputs(args.input), args.vocab_size, args.output, args.max_documents,
                                seed=args.seed)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
