"""Accuracy of a fine-tuned run (or of its base) on instruction test files, and Table 7/8-style
comparisons of several runs:

    python -m megatron_lax.finetune_eval evaluate --checkpoint RUN [--test FILE ...] [--output acc.json]
    python -m megatron_lax.finetune_eval evaluate --base PATH --test FILE ... [--output acc.json]
    python -m megatron_lax.finetune_eval table acc1.json acc2.json ... [--output table.md]

Answers are decoded with a KV cache, in batches of left-padded prompts, by beam search
(finetune.num_beams, 4 as in LLM-Adapters) or greedily (--num-beams 1), in the training precision
(bf16 on a GPU). A test record needs `instruction` and `answer` (LLM-Adapters' test files leave
`output` empty); every record left out is counted and printed. How an answer is read follows
LLM-Adapters, by dataset (the directory name of LLM-Adapters' `dataset/NAME/test.json`, else the
file name): gsm8k, SVAMP, mawps, AddSub, MultiArith, SingleEq: the last number of the response
(commas removed) within 1e-3 of the answer; AQuA, mathqa: the first option letter A-E; boolq,
piqa, social_i_qa, ARC-Challenge, ARC-Easy, openbookqa, hellaswag, winogrande: the first of the
dataset's option labels (true/false, solution1-2, answer1-3, answer1-5, answer1-4, ending1-4,
option1-2) that the response names. A file of another name is graded by the option labels its
instructions list ("Answer format: a/b/c"), else by number when every answer is a number; answers
mixing numbers and labels are refused.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch

from .parallel import trust
from .training import checkpoint
from .data import instructions as instruct
from .generate import decode_batch

NUMBER = re.compile(r"-?\d+\.?\d*")
TOLERANCE = 1e-3
NUMERIC_DATASETS = ("gsm8k", "svamp", "mawps", "addsub", "multiarith", "singleeq")
LETTERS = ("A", "B", "C", "D", "E")
LABEL_DATASETS = {"aqua": LETTERS, "mathqa": LETTERS, "boolq": ("true", "false"),
                  "piqa": ("solution1", "solution2"), "social_i_qa": ("answer1", "answer2", "answer3"),
                  "arc-challenge": tuple(f"answer{i}" for i in range(1, 6)),
                  "arc-easy": tuple(f"answer{i}" for i in range(1, 6)),
                  "openbookqa": tuple(f"answer{i}" for i in range(1, 5)),
                  "hellaswag": tuple(f"ending{i}" for i in range(1, 5)), "winogrande": ("option1", "option2")}
ANSWER_FORMAT = re.compile(r"Answer format:\s*([A-Za-z0-9_]+(?:\s*/\s*[A-Za-z0-9_]+)+)")


# --- decoding ----------------------------------------------------------------------------------------

def responses(model, tokenizer, records: list[dict], max_new_tokens: int, batch_size: int, num_beams: int = 1,
              bos: bool = False) -> list[str]:
    """The decoded response to each record's prompt, longest prompts first in each batch (less padding)."""
    prompts = instruct.prompt_ids(records, tokenizer, bos)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [""] * len(prompts)
    for i in range(0, len(order), batch_size):
        chunk = order[i: i + batch_size]
        for j, ids in zip(chunk, decode_batch(model, [prompts[j] for j in chunk], max_new_tokens, tokenizer.eos_id,
                                              num_beams)):
            out[j] = tokenizer.decode(ids)
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


def dataset_name(path) -> str:
    """LLM-Adapters' layout is dataset/NAME/test.json: the directory names the dataset; any other
    file is named by its stem."""
    path = Path(path)
    return (path.parent.name if path.stem in ("test", "train") else path.stem).lower()


def labels_of(record: dict, dataset: str) -> tuple | None:
    """The option labels a record's answer is chosen from, or None for a numeric answer."""
    if dataset in LABEL_DATASETS:
        return LABEL_DATASETS[dataset]
    found = ANSWER_FORMAT.search(record["instruction"])
    return tuple(label.strip() for label in found.group(1).split("/")) if found else None


def graders(path, records: list[dict]) -> list:
    """One correct(response) -> bool per record; ValueError for a file whose answers cannot be
    graded one way (numbers mixed with labels, or labels with no option set to choose from)."""
    dataset = dataset_name(path)
    answers = [str(r["answer"]).strip() for r in records]
    label_sets = [None if dataset in NUMERIC_DATASETS else labels_of(r, dataset) for r in records]
    numeric = [labels is None for labels in label_sets]
    if any(numeric) and not all(numeric):
        raise ValueError(f"{path}: some records list answer options and some do not; grade them as separate files")
    if all(numeric):
        bad = [a for a in answers if not is_number(a)]
        if bad:
            kind = "are a numeric dataset's" if dataset in NUMERIC_DATASETS else "mix numbers and labels"
            raise ValueError(f"{path}: the answers {kind}, but {len(bad)} are not numbers (e.g. {bad[0]!r}); for "
                             f"an option dataset name its directory as LLM-Adapters does or list the options as "
                             f"'Answer format: a/b' in the instructions")
        return [lambda response, a=float(a.replace(",", "")): numeric_correct(response, a) for a in answers]
    out = []
    for record, answer, labels in zip(records, answers, label_sets):
        letters = labels == LETTERS
        gold = answer.strip("() ").upper() if letters else answer
        if gold not in labels:
            raise ValueError(f"{path}: the answer {answer!r} is not one of the options {'/'.join(labels)}")
        pattern = re.compile(r"\b(" + "|".join(re.escape(x) for x in sorted(labels, key=len, reverse=True)) + r")\b")
        out.append(lambda response, p=pattern, g=gold: label_correct(response, p, g))
    return out


def numeric_correct(response: str, answer: float) -> bool:
    predicted = last_number(response)
    return predicted is not None and abs(predicted - answer) <= TOLERANCE


def label_correct(response: str, pattern: re.Pattern, answer: str) -> bool:
    found = pattern.search(response)
    return found is not None and found.group(1) == answer


def read_test_file(path) -> tuple[list[dict], Counter]:
    """The usable test records and the counts of those left out, printed."""
    records, skipped = instruct.read_records(path, test=True)
    if skipped:
        print(instruct.describe_skipped(path, skipped), file=sys.stderr)
    if not records:
        raise ValueError(f"{path}: no usable test records (each needs an instruction and an answer)")
    return records, skipped


def accuracy(model, tokenizer, path, max_new_tokens: int, batch_size: int, num_beams: int = 1,
             bos: bool = False) -> dict:
    records, skipped = read_test_file(path)
    correct = graders(path, records)
    texts = responses(model, tokenizer, records, max_new_tokens, batch_size, num_beams, bos)
    hits = [check(t) for check, t in zip(correct, texts)]
    return {"file": str(path), "dataset": dataset_name(path), "n": len(records), "correct": sum(hits),
            "accuracy": sum(hits) / len(records), "skipped": dict(skipped), "num_beams": num_beams,
            "examples": [{"answer": str(r["answer"]), "response": t, "correct": h}
                         for r, t, h in zip(records, texts, hits)]}


# --- teacher-forced losses ------------------------------------------------------------------------------

def answer_char_span(output: str, answer: str) -> tuple[int, int] | None:
    """Where the answer is first computed in a worked solution ("... = 12"), else its last mention."""
    found = re.search(r"=\s*(" + re.escape(answer) + r")(?!\d)", output)
    if found:
        return found.span(1)
    at = output.rfind(answer)
    return (at, at + len(answer)) if at >= 0 else None


def token_char_ends(tokenizer, ids: list[int]) -> list[int]:
    return [len(tokenizer.decode(ids[: j + 1])) for j in range(len(ids))]


@torch.no_grad()
def teacher_forced(model, tokenizer, records: list[dict], batch_size: int = 32, bos: bool = False) -> dict:
    """Mean NLL per token (nats) of the gold response + EOS given the prompt (`response_loss`), and of
    the tokens that spell the answer where the solution first computes it (`answer_loss`): a
    continuous companion to exact match. Records need a non-empty `output`."""
    device = next(model.parameters()).device
    prompts = instruct.prompt_ids(records, tokenizer, bos)
    outputs = tokenizer.encode_batch([r["output"] for r in records])
    totals = Counter()
    for i in range(0, len(records), batch_size):
        rows = list(range(i, min(i + batch_size, len(records))))
        seqs = [prompts[j] + outputs[j] + [tokenizer.eos_id] for j in rows]
        width = max(len(q) for q in seqs)
        x = torch.zeros(len(rows), width - 1, dtype=torch.long)
        for r, q in enumerate(seqs):
            x[r, : len(q) - 1] = torch.tensor(q[:-1])
        logprobs = torch.log_softmax(model(x.to(device)).float(), -1).cpu()
        for r, j in enumerate(rows):
            n_prompt, q = len(prompts[j]), seqs[r]
            nll = [-float(logprobs[r, t - 1, q[t]]) for t in range(n_prompt, len(q))]
            totals["response"] += sum(nll)
            totals["response_tokens"] += len(nll)
            span = answer_char_span(records[j]["output"], str(records[j]["answer"]).strip())
            if span is None:
                continue
            ends, begin = token_char_ends(tokenizer, outputs[j]), 0
            for t, end in enumerate(ends):
                if begin < span[1] and end > span[0]:
                    totals["answer"] += nll[t]
                    totals["answer_tokens"] += 1
                begin = end
    return {"response_loss": totals["response"] / max(1, totals["response_tokens"]),
            "answer_loss": totals["answer"] / max(1, totals["answer_tokens"]),
            "answer_tokens": totals["answer_tokens"]}


# --- what is evaluated ------------------------------------------------------------------------------

def load_for_eval(checkpoint_dir: Path | None, base: str | None):
    """(model, tokenizer spec, the run's config or None, a description) for a fine-tuning run (its
    best-validation checkpoint when finetune.keep_best kept one), or for a bare base model."""
    from .tasks.instruction_tuning import method_label
    from .models.lora import trainable_parameters
    from .loading.bases import base_tokenizer, load_base
    from .loading.finetuned import load_finetuned, selected_checkpoint

    if base:
        model = load_base(base)
        info = {"method": "base", "trainable": 0, "base": base, "seed": None}
        return model, base_tokenizer(base), None, {**info, "parameters": sum(p.numel() for p in model.parameters())}
    model, cfg, ckpt = load_finetuned(selected_checkpoint(checkpoint_dir))
    info = {"method": method_label(cfg), "trainable": trainable_parameters(model), "checkpoint": str(ckpt),
            "seed": cfg.train.seed}
    return model, cfg.data.tokenizer, cfg, {**info, "parameters": sum(p.numel() for p in model.parameters())}


def eval_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The training precision: bf16 on a GPU for auto / bf16-mixed / bf16-pure, fp32 on a CPU or for fp32."""
    if device.type == "cuda" and precision in ("auto", "bf16", "bf16-mixed", "bf16-pure"):
        return torch.bfloat16
    return torch.float32


def evaluate(checkpoint_dir: Path | None, base: str | None, tests: list[str], max_new_tokens: int = 0,
             batch_size: int = 32, label: str | None = None, num_beams: int = 0, precision: str = "") -> dict:
    from .data.tokenizer import load_tokenizer

    from .tasks.instruction_tuning import uses_bos

    model, tokenizer_spec, run_cfg, info = load_for_eval(checkpoint_dir, base)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = precision or (run_cfg.train.precision if run_cfg else "auto")
    model.to(device, eval_dtype(precision, device))
    f = run_cfg.finetune if run_cfg else None
    tests = tests or (f.test_json if f else [])
    if not tests:
        raise ValueError("no test files: give --test or set finetune.test_json in the run's config")
    max_new_tokens = max_new_tokens or (f.max_new_tokens if f else 64)
    num_beams = num_beams or (f.num_beams if f else 4)
    tokenizer = load_tokenizer(tokenizer_spec)
    bos = uses_bos(f.add_bos if f else "auto", f.base if f else base, tokenizer)
    files = [accuracy(model, tokenizer, path, max_new_tokens, batch_size, num_beams, bos) for path in tests]
    return {**info, "method": label or info["method"], "bos": bos, "precision": str(eval_dtype(precision, device)),
            "files": files}


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
    run.add_argument("--num-beams", type=int, default=0, help="default: the run's finetune.num_beams (4); 1 is greedy")
    run.add_argument("--precision", default="", help="auto | fp32 | bf16 (default: the run's train.precision)")
    run.add_argument("--label", help="the method's name in tables (default: LoRA / LaX-LoRA (gate) / base)")
    run.add_argument("--output", type=Path, help="write the result as JSON")
    run.add_argument("--trust-checkpoint", action="store_true", help="unpickle checkpoint files that need it (DeepSpeed's) from this source; only for files you trust")
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
        with trust.trusting(everything=args.trust_checkpoint):
            result = evaluate(args.checkpoint, args.base, args.test, args.max_new_tokens, args.batch_size, args.label,
                              args.num_beams, args.precision)
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
