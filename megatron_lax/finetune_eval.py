"""Accuracy of a fine-tuned run (or of its base) on instruction test files, and Table 7/8-style
comparisons of several runs:

    python -m megatron_lax.finetune_eval evaluate --checkpoint RUN [--test FILE ...] [--output acc.json]
    python -m megatron_lax.finetune_eval evaluate --base PATH --test FILE ... [--output acc.json]
    python -m megatron_lax.finetune_eval table acc1.json acc2.json ... [--output table.md]

Answers are decoded greedily (batched, right-padded, no KV cache: each sequence's next token is
read at its own last position). Answer extraction follows LLM-Adapters: when every `answer` of a
file is a number, the last number of the response (commas removed) must be within 1e-3 of it;
otherwise the first option label of the file (e.g. true/false, option1/option2, A-E) that the
response names, as a whole word, must equal it.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

from . import checkpoint, instruct

NUMBER = re.compile(r"-?\d+\.?\d*")
TOLERANCE = 1e-3


# --- decoding ----------------------------------------------------------------------------------------

@torch.no_grad()
def greedy_batch(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int) -> list[list[int]]:
    """The greedy continuation of each prompt, up to and without EOS."""
    device = next(model.parameters()).device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.full((len(prompts), int(lengths.max()) + max_new_tokens), pad_id, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        ids[row, :len(p)] = torch.tensor(p)
    active = torch.ones(len(prompts), dtype=torch.bool, device=device)
    rows = torch.arange(len(prompts), device=device)
    for _ in range(max_new_tokens):
        logits = model(ids[:, :int(lengths.max())])
        token = logits[rows, lengths - 1].argmax(-1)
        ids[rows[active], lengths[active]] = token[active]
        lengths = lengths + active.long()
        active &= token != eos_id
        if not active.any():
            break
    return [[t for t in ids[row, len(p):int(lengths[row])].tolist() if t != eos_id] for row, p in enumerate(prompts)]


def responses(model, tokenizer, records: list[dict], max_new_tokens: int, batch_size: int) -> list[str]:
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    out = []
    for i in range(0, len(records), batch_size):
        prompts = tokenizer.encode_batch([instruct.prompt(r) for r in records[i: i + batch_size]])
        out += [tokenizer.decode(ids) for ids in greedy_batch(model, prompts, max_new_tokens, tokenizer.eos_id, pad_id)]
    return out


# --- answers ----------------------------------------------------------------------------------------

def last_number(text: str) -> float | None:
    found = NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def is_number(text) -> bool:
    try:
        return math.isfinite(float(str(text).replace(",", "")))
    except ValueError:
        return False


def grader(answers: list[str]):
    """correct(response, answer) for one file: numeric when every answer is a number, else labels."""
    if all(is_number(a) for a in answers):
        def numeric(response: str, answer: str) -> bool:
            predicted = last_number(response)
            return predicted is not None and abs(predicted - float(str(answer).replace(",", ""))) <= TOLERANCE
        return numeric
    labels = re.compile(r"\b(" + "|".join(re.escape(a) for a in sorted(set(answers), key=len, reverse=True)) + r")\b")

    def choice(response: str, answer: str) -> bool:
        found = labels.search(response)
        return found is not None and found.group(1) == answer
    return choice


def accuracy(model, tokenizer, path, max_new_tokens: int, batch_size: int) -> dict:
    usable, skipped = instruct.read_records(path)
    records = [r for r in usable if "answer" in r]
    if len(records) < len(usable):
        skipped["no_answer"] += len(usable) - len(records)
    if not records:
        raise ValueError(f"{path}: no usable test records with an answer")
    answers = [str(r["answer"]) for r in records]
    texts = responses(model, tokenizer, records, max_new_tokens, batch_size)
    correct = grader(answers)
    hits = [correct(t, a) for t, a in zip(texts, answers)]
    return {"file": str(path), "n": len(records), "correct": sum(hits), "accuracy": sum(hits) / len(records),
            "skipped": dict(skipped), "examples": [{"answer": a, "response": t, "correct": h}
                                                   for a, t, h in list(zip(answers, texts, hits))[:5]]}


# --- what is evaluated ------------------------------------------------------------------------------

def load_for_eval(checkpoint_dir: Path | None, base: str | None):
    """(model, tokenizer spec, the run's finetune config or None, a description) for a fine-tuning
    run, or for a bare base model."""
    from .finetune import base_tokenizer, load_base, load_finetuned, method_label
    from .lora import trainable_parameters

    if base:
        model = load_base(base)
        info = {"method": "base", "trainable": 0, "base": base, "seed": None}
        return model, base_tokenizer(base), None, {**info, "parameters": sum(p.numel() for p in model.parameters())}
    model, cfg, ckpt = load_finetuned(checkpoint_dir)
    info = {"method": method_label(cfg), "trainable": trainable_parameters(model), "checkpoint": str(ckpt),
            "seed": cfg.train.seed}
    return model, cfg.data.tokenizer, cfg.finetune, {**info, "parameters": sum(p.numel() for p in model.parameters())}


def evaluate(checkpoint_dir: Path | None, base: str | None, tests: list[str], max_new_tokens: int = 0,
             batch_size: int = 32, label: str | None = None) -> dict:
    from tokenizer import load_tokenizer

    model, tokenizer_spec, run_cfg, info = load_for_eval(checkpoint_dir, base)
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    tests = tests or (run_cfg.test_json if run_cfg else [])
    if not tests:
        raise ValueError("no test files: give --test or set finetune.test_json in the run's config")
    max_new_tokens = max_new_tokens or (run_cfg.max_new_tokens if run_cfg else 64)
    tokenizer = load_tokenizer(tokenizer_spec)
    files = [accuracy(model, tokenizer, path, max_new_tokens, batch_size) for path in tests]
    return {**info, "method": label or info["method"], "files": files}


# --- the comparison table ---------------------------------------------------------------------------

def mean_spread(values: list[float]) -> str:
    """mean ± sample standard deviation, in percent; the spread is left out for a single run."""
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def table(results: list[dict]) -> str:
    """One row per method (runs of the same method, e.g. seeds, pooled): trainable share, accuracy
    per test file and the average over files, as mean ± standard deviation over runs."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for result in results:
        by_method[result["method"]].append(result)
    files = [Path(f["file"]).stem for f in results[0]["files"]]
    lines = [f"| method | runs | trainable parameters | {' | '.join(files)} | avg |",
             "|---" * (len(files) + 4) + "|"]
    for method, runs in by_method.items():
        cells = [mean_spread([run["files"][i]["accuracy"] for run in runs]) for i in range(len(files))]
        average = mean_spread([statistics.fmean(f["accuracy"] for f in run["files"]) for run in runs])
        share = f"{runs[0]['trainable']:,} ({100 * runs[0]['trainable'] / runs[0]['parameters']:.2f}%)"
        lines.append(f"| {method} | {len(runs)} | {share} | {' | '.join(cells)} | {average} |")
    return "\n".join(lines)


def read_results(paths: list[str]) -> list[dict]:
    results = []
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a finetune_eval result ({e})") from None
        if not isinstance(result, dict) or not {"method", "files", "trainable", "parameters"} <= result.keys():
            raise ValueError(f"{path}: not a finetune_eval result (method, files, trainable or parameters missing)")
        results.append(result)
    if not results:
        raise ValueError("no result files given")
    stems = {tuple(Path(f["file"]).stem for f in r["files"]) for r in results}
    if len(stems) > 1:
        raise ValueError(f"the results cover different test files: {sorted(stems)}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_lax.finetune_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("evaluate", help="accuracy of a fine-tuning run or a base model on test files")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="fine-tuning run or checkpoint directory")
    source.add_argument("--base", help="a base model (run, export or Hugging Face directory), without adapters")
    run.add_argument("--test", nargs="*", default=[], help="test JSON files (default: the run's finetune.test_json)")
    run.add_argument("--max-new-tokens", type=int, default=0, help="default: the run's finetune.max_new_tokens, or 64")
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument("--label", help="the method's name in tables (default: LoRA / LaX-LoRA (gate) / base)")
    run.add_argument("--output", type=Path, help="write the result as JSON")
    summary = commands.add_parser("table", help="a Markdown table of several evaluate results")
    summary.add_argument("results", nargs="+")
    summary.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "table":
            text = table(read_results(args.results))
            if args.output:
                args.output.write_text(text + "\n")
            print(text)
            return 0
        result = evaluate(args.checkpoint, args.base, args.test, args.max_new_tokens, args.batch_size, args.label)
    except (ValueError, FileNotFoundError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1))
    for f in result["files"]:
        print(f"{result['method']}: {f['file']}: accuracy {100 * f['accuracy']:.1f}% ({f['correct']}/{f['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
