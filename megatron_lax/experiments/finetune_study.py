"""The CPU-scale study of LoRA against LaX-LoRA (docs/FINETUNING.md, "The study"):

    python -m megatron_lax.finetune_study probe --base RUN [--output probe.json]
    python -m megatron_lax.finetune_study run --config configs/finetune_study.yaml --out DIR [--seeds 0 1 2 3 4]
    python -m megatron_lax.finetune_study tune --config C --base SELECTION_BASE --select FILE --out TUNED
        --cells lora_r4 ... [--rates ...]
    python -m megatron_lax.finetune_study run --config C --out DIR --cells ... --lrs TUNED --seeds 1 2 ...
        [--bases BASE1 BASE2 BASE3]
    python -m megatron_lax.finetune_study table DIR [--output table.md]
    python -m megatron_lax.finetune_study same-weights BASE_A BASE_B

`probe` asks the base, before any fine-tuning, whether it can do what the task needs, on sentences
of its own pre-training text with every operand pair: copy the two numbers of a sentence into the
equation that follows them, and complete the equation with the fact it saw in pre-training.

`run` fine-tunes every cell (a method at a rank) with every seed, one after the other in this
process, and writes DIR/CELL/seedS/result.json (skipped when present, so an interrupted study
resumes): exact match on the whole test file (greedy decoding) and the teacher-forced losses of the
gold response and of its answer tokens. LoRA and LaX-LoRA of one seed share A's initialisation
(seeded by parameter name), the held-out split and the example order (data.seed = train.seed).

`tune` chooses each cell's learning rate at full length by exact match on a selection file in a wording
that neither training nor the test files use, on a selection base and selection seeds that the report
does not use (`tune`'s docstring); `run --lrs` then runs each cell at its own rate. `run --bases` runs
every cell and seed on each of several pre-trained bases (DIR/BASE/CELL/seedS/result.json), since the
base is a source of variance as the seed is (issue 36: a fresh base reversed a one-base conclusion).

`table` reports each cell's mean ± sample standard deviation over seeds, and each LaX-LoRA cell's
per-seed difference from LoRA at the same rank and seed (mean ± standard deviation, and on how many
seeds LaX-LoRA was better). Results that keep per-problem hits (every run since the template study) get
`effects_table` instead: per test file, paired intervals and sign tests; a directory of bases gets
`pooled_table`: every comparison pooled over bases x seeds with intervals that resample bases, and per base.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

# cell name -> overrides; the rank is added per cell ("lora_r1", "lax_identity_r1", ...)
METHODS = {
    "lora": {"lora.lax_gate": "none"},
    "lax_identity": {"lora.lax_gate": "identity"},
    "lax_linear": {"lora.lax_gate": "linear"},
    "lax_identity_projection": {"lora.lax_gate": "identity", "lora.lax_latent": "projection"},
    "lax_linear_projection": {"lora.lax_gate": "linear", "lora.lax_latent": "projection"},
    # without the LayerNorm on the crossed latent (the paper's Table 22): at rank 1 a LayerNorm over one
    # feature outputs its bias whatever the input, so LaX-LoRA with it is a constant per block there
    "lax_identity_nonorm": {"lora.lax_gate": "identity", "lora.lax_norm": "false"},
    "lax_linear_nonorm": {"lora.lax_gate": "linear", "lora.lax_norm": "false"},
}
FULL = "full"


# --- the probe ----------------------------------------------------------------------------------------

def probe_items(max_number: int = 12, max_factor: int = 6) -> list[tuple[str, str, str]]:
    """(prefix, operands as the text writes them, result) for every operand pair, in sentences of the
    narrative pre-training text (data_prep.make_arithmetic.narrative_sentence)."""
    rng = random.Random("probe")
    items = []
    for a in range(2, max_number + 1):
        for b in range(2, max_number + 1):
            n, m = rng.sample(["Anna", "Ben", "Carla", "David", "Emma", "Hugo"], 2)
            items.append((f"{n} put {a} apples on the table and {m} added {b}; ", f"{a} + {b} =", str(a + b)))
            hi, lo = max(a, b) + min(a, b), min(a, b)  # the text subtracts an operand from a sum
            items.append((f"{n} had {hi} shells but lost {lo} of them on the way home, leaving ", f"{hi} - {lo} =",
                          str(hi - lo)))
    for x in range(2, max_factor + 1):
        for y in range(2, max_factor + 1):
            items.append((f"Hugo kept {x} boxes of {y} stamps each in the shed, ", f"{x} x {y} =", str(x * y)))
    return items


def first_number(text: str) -> str | None:
    import re
    found = re.search(r"\d+", text)
    return found.group(0) if found else None


@torch.no_grad()
def probe(model, tokenizer, items) -> dict:
    """copy: the greedy continuation of the prefix starts with the equation's operands; fact: given
    the prefix and the equation, the next number is the result."""
    from ..generate import decode_batch
    copied = fact = 0
    examples = []
    for i in range(0, len(items), 64):
        chunk = items[i: i + 64]
        copies = decode_batch(model, tokenizer.encode_batch([p.rstrip() for p, _, _ in chunk]), 8, tokenizer.eos_id)
        facts = decode_batch(model, tokenizer.encode_batch([p + e for p, e, _ in chunk]), 4, tokenizer.eos_id)
        for (prefix, equation, result), c, f in zip(chunk, copies, facts):
            copy_text, fact_text = tokenizer.decode(c).strip(), tokenizer.decode(f)
            copied += copy_text.startswith(equation)
            fact += first_number(fact_text) == result
            if len(examples) < 6:
                examples.append({"prefix": prefix, "continuation": copy_text, "after_equation": fact_text})
    return {"items": len(items), "copy": copied / len(items), "fact": fact / len(items), "examples": examples}


# --- the runs -----------------------------------------------------------------------------------------

def cell(name: str) -> tuple[str, dict]:
    """`full`, or METHOD_rRANK (alpha is 2 x rank in every cell)."""
    if name == FULL:
        return name, {"finetune.full": "true"}
    method, _, rank = name.rpartition("_r")
    if method not in METHODS or not rank.isdigit():
        raise ValueError(f"unknown cell {name!r} (full, or one of {', '.join(METHODS)} followed by _rRANK)")
    return name, {**METHODS[method], "lora.rank": rank, "lora.alpha": str(2 * int(rank))}


def cells(ranks: list[int], methods: list[str], full: bool) -> list[tuple[str, dict]]:
    return [cell(f"{method}_r{rank}") for rank in ranks for method in methods] + ([cell(FULL)] if full else [])


def run_one(config: str, overrides: dict, run_dir: Path, full_lr: float) -> dict:
    """Fine-tune one cell and score every file of finetune.test_json (exact match per problem, greedy) and
    its teacher-forced losses (tuning runs set test_json to the selection file alone)."""
    from ..data.tokenizer import load_tokenizer

    from ..config import load_config
    from ..finetune import finetune
    from ..tasks.instruction_tuning import uses_bos
    from ..loading.finetuned import load_finetuned
    from ..finetune_eval import accuracy, read_test_file, teacher_forced
    from ..models.lora import trainable_parameters

    values = {**overrides, "logging.run_dir": str(run_dir), "logging.progress": "false",
              "logging.tensorboard": "false", "logging.lax_stats_every": "0",
              "checkpoint.resume": "auto"}  # a cell cut short continues where it stopped
    if overrides.get("finetune.full") == "true" and "optim.lr" not in overrides:
        values["optim.lr"] = str(full_lr)
    cfg = load_config(config, values)
    start = time.time()
    summary = finetune(cfg)
    train_seconds = time.time() - start
    model, cfg, _ = load_finetuned(run_dir)
    f = cfg.finetune
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    bos = uses_bos(f.add_bos, f.base, tokenizer)
    result = {"overrides": overrides, "seed": cfg.train.seed, "lr": cfg.optim.lr,
              "trainable": trainable_parameters(model), "val_loss": summary["val_loss"],
              "train_seconds": train_seconds, "files": []}
    for path in f.test_json:
        acc = accuracy(model, tokenizer, path, f.max_new_tokens, 64, f.num_beams, bos)
        losses = teacher_forced(model, tokenizer, read_test_file(path)[0], 64, bos)
        result["files"].append({**{k: acc[k] for k in ("file", "n", "correct", "accuracy")}, **losses,
                                "hits": [int(e["correct"]) for e in acc["examples"]],
                                "examples": acc["examples"]})
    result["seconds"] = time.time() - start
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the result is what the study keeps
    return result


def run_cell(config: str, target: Path, name: str, overrides: dict, seed: int, full_lr: float, base: str,
             extra: dict | None) -> dict:
    """One cell and seed, written to `target` (read back when it is there already: a study resumes)."""
    if target.is_file():
        return json.loads(target.read_text())
    overrides = {**overrides, "train.seed": str(seed), "data.seed": str(seed),
                 **({"finetune.base": base} if base else {}), **(extra or {})}
    result = run_one(config, overrides, target.parent / "run", full_lr)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1))
    scores = f"held-out loss {result['val_loss']:.4f}"
    for f in result["files"]:
        scores += (f"; {Path(f['file']).stem}: exact match {100 * f['accuracy']:.1f}%, answer loss "
                   f"{f['answer_loss']:.3f}, response loss {f['response_loss']:.4f}")
    print(f"{name} lr {result['lr']:g} seed {seed}: {scores} ({result['seconds']:.0f}s)", flush=True)
    return result


def run(config: str, out: Path, seeds: list[int], plan: list[tuple[str, dict]], full_lr: float, base: str = "",
        extra: dict | None = None, lrs: dict[str, float] | None = None, bases: list[str] | None = None) -> None:
    """Seed by seed (every cell of seed 0, then of seed 1, ...), so that a study cut short has whole seeds.
    `lrs` (cell -> rate, as `tune` writes) sets each cell's own learning rate. `bases` (run directories of
    pre-trained bases): every seed's cells on each base in turn, in OUT/BASE/CELL/seedS (BASE: the base
    directory's name), so that a study cut short has whole seeds on every base."""
    missing = [name for name, _ in plan if lrs and name not in lrs]
    if missing:
        raise SystemExit(f"no chosen rate for {', '.join(missing)}: run `finetune_study tune` for them first")
    names = [Path(b).name for b in bases or []]
    if len(set(names)) != len(names):
        raise SystemExit(f"--bases: two bases share a folder name ({', '.join(names)}); their runs would mix")
    for seed in seeds:
        for base_dir, where in zip(bases, names) if bases else [(base, None)]:
            for name, overrides in plan:
                if lrs:
                    overrides = {**overrides, "optim.lr": repr(lrs[name])}
                target = (out / where if where else out) / name / f"seed{seed}" / "result.json"
                run_cell(config, target, name, overrides, seed, full_lr, base_dir, extra)


# --- choosing each cell's learning rate -----------------------------------------------------------------

SELECTION_FILE = "data/arithmetic_templates/select_templates.json"  # the template split's selection wording


def selection_score(result: dict, select: str) -> tuple[float, float]:
    """(exact match, -answer loss) on the selection file: higher is better, exact match first."""
    if [f["file"] for f in result["files"]] != [select]:
        raise SystemExit(f"a tuning run of seed {result['seed']} at {result['lr']:g} was scored on "
                         f"{[f['file'] for f in result['files']]}, not on {select} alone (an older protocol's "
                         f"run?): tune into another --out")
    return result["files"][0]["accuracy"], -result["files"][0]["answer_loss"]


def tune(config: str, out: Path, plan: list[tuple[str, dict]], rates: list[float], full_rates: list[float],
         seeds: list[int], finalists: int, base: str = "", extra: dict | None = None,
         select: str = SELECTION_FILE) -> dict[str, float]:
    """Each cell's learning rate, chosen at full length by exact match (greedy) on `select`, problems in a
    wording that neither training nor the test files use, so that the choice measures transfer to new text
    (the held-out loss of training examples separates rates by hundredths of a nat while exact match on a
    new wording moves by 5-10 points; issue 36): every rate of the grid on the first seed (plus one rate past
    an edge of the grid that wins), the best `finalists` on the other seeds too, and the highest mean exact
    match over the seeds wins (ties: the lower mean answer loss). Only `select` is evaluated, never the
    config's test files; `base` should be a selection base that no reported figure uses.
    Writes OUT/CELL/lrLR/seedS/result.json and OUT/CELL/chosen.json."""
    extra = {**(extra or {}), "finetune.test_json": select}
    chosen = {}
    for name, overrides in plan:
        grid = sorted(full_rates if name == FULL else rates)

        def score(lr: float, seed: int) -> tuple[float, float]:
            target = out / name / f"lr{lr:g}" / f"seed{seed}" / "result.json"
            return selection_score(run_cell(config, target, name, {**overrides, "optim.lr": repr(lr)}, seed, 0.0,
                                            base, extra), select)

        first = {lr: score(lr, seeds[0]) for lr in grid}
        best = max(first, key=first.get)
        if len(grid) > 1 and best in (grid[0], grid[-1]):  # the grid's edge won: look one step past it
            step = grid[1] / grid[0] if best == grid[0] else grid[-1] / grid[-2]
            past = float(f"{best / step if best == grid[0] else best * step:.0e}")  # one significant digit
            first[past] = score(past, seeds[0])
        ranked = sorted(first, key=first.get, reverse=True)[:finalists]
        mean = {lr: tuple(map(statistics.fmean, zip(first[lr], *(score(lr, s) for s in seeds[1:])))) for lr in ranked}
        chosen[name] = max(mean, key=mean.get)
        shown = lambda v: f"{100 * v[0]:.1f}% ({-v[1]:.3f})"
        print(f"{name}: exact match (answer loss) on {Path(select).name}, seed {seeds[0]}: " +
              ", ".join(f"{lr:g} {shown(v)}" for lr, v in sorted(first.items())) + f"; finalists over seeds {seeds}: "
              + ", ".join(f"{lr:g} {shown(v)}" for lr, v in mean.items()) + f"; chosen {chosen[name]:g}", flush=True)
        (out / name / "chosen.json").write_text(json.dumps({
            "lr": chosen[name], "selection_file": select, "seeds": seeds,
            "exact_match": {f"{lr:g}": v[0] for lr, v in mean.items()},
            "answer_loss": {f"{lr:g}": -v[1] for lr, v in mean.items()}}) + "\n")
    return chosen


def chosen_rates(tuned: Path) -> dict[str, float]:
    """cell -> the rate `tune` chose, from TUNED/CELL/chosen.json."""
    rates = {path.parent.name: json.loads(path.read_text())["lr"] for path in sorted(tuned.glob("*/chosen.json"))}
    if not rates:
        raise SystemExit(f"no chosen rates under {tuned}: run `finetune_study tune` first")
    return rates


# --- the table ----------------------------------------------------------------------------------------

def read_results(out: Path) -> dict[str, dict[int, dict]]:
    results: dict[str, dict[int, dict]] = {}
    for path in sorted(out.glob("*/seed*/result.json")):
        result = json.loads(path.read_text())
        results.setdefault(path.parent.parent.name, {})[result["seed"]] = result
    return results


def spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    mean = scale * statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def cell_order(names) -> list[str]:
    """By rank, then in METHODS' order, full fine-tuning last."""
    def key(name):
        if name == FULL:
            return (1, 0, 0)
        method, rank = name.rsplit("_r", 1)
        return (0, int(rank), list(METHODS).index(method))
    return sorted(names, key=key)


def lora_of(name: str) -> str | None:
    """The LoRA cell a LaX-LoRA cell is compared with (the same rank); None for any other cell."""
    return "lora_r" + name.rsplit("_r", 1)[1] if name.startswith("lax") else None


def table(out: Path) -> str:
    """Markdown: one row per cell; LaX-LoRA rows add the paired per-seed differences from LoRA."""
    results = read_results(out)
    metric = lambda r, key: r["files"][0][key]
    lines = ["| cell | seeds | trainable | exact match % | Δ EM vs LoRA (pp) | LaX better (EM) | answer loss | "
             "Δ answer loss vs LoRA | LaX lower (loss) |", "|---" * 9 + "|"]
    order = cell_order(results)
    for cell in order:
        runs = results[cell]
        seeds = sorted(runs)
        em = [metric(runs[s], "accuracy") for s in seeds]
        loss = [metric(runs[s], "answer_loss") for s in seeds]
        row = [cell, str(len(seeds)), f"{runs[seeds[0]]['trainable']:,}", spread(em, 100), "", "", spread(loss, 1, 3),
               "", ""]
        baseline = results.get(lora_of(cell))
        if baseline:
            paired = [s for s in seeds if s in baseline]
            d_em = [metric(runs[s], "accuracy") - metric(baseline[s], "accuracy") for s in paired]
            d_loss = [metric(runs[s], "answer_loss") - metric(baseline[s], "answer_loss") for s in paired]
            row[4] = spread(d_em, 100)
            row[5] = f"{sum(d > 0 for d in d_em)}/{len(paired)} (ties {sum(d == 0 for d in d_em)})"
            row[7] = spread(d_loss, 1, 3)
            row[8] = f"{sum(d < 0 for d in d_loss)}/{len(paired)}"
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Per-seed differences from LoRA at the same rank (exact match in points; answer loss):", "",
              "| cell | " + " | ".join(f"seed {s}" for s in sorted({s for r in results.values() for s in r})) + " |",
              "|---" * (1 + len({s for r in results.values() for s in r})) + "|"]
    all_seeds = sorted({s for r in results.values() for s in r})
    for cell in order:
        baseline = results.get(lora_of(cell))
        if not baseline:
            continue
        runs = results[cell]
        cells_text = [f"{100 * (metric(runs[s], 'accuracy') - metric(baseline[s], 'accuracy')):+.1f}; "
                      f"{metric(runs[s], 'answer_loss') - metric(baseline[s], 'answer_loss'):+.3f}"
                      if s in runs and s in baseline else "" for s in all_seeds]
        lines.append(f"| {cell} | " + " | ".join(cells_text) + " |")
    return "\n".join(lines)


# --- intervals ----------------------------------------------------------------------------------------

def paired_bootstrap(ours, theirs, reps: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """Mean exact-match difference of two cells over (seed, problem), with a 95% percentile interval
    from resampling seeds and test problems together (the same draws for both cells: paired)."""
    import numpy as np
    d = np.asarray(ours, dtype=float) - np.asarray(theirs, dtype=float)  # seeds x problems
    rng = np.random.default_rng(seed)
    n_seeds, n_items = d.shape
    means = [d[np.ix_(rng.integers(0, n_seeds, n_seeds), rng.integers(0, n_items, n_items))].mean()
             for _ in range(reps)]
    low, high = np.percentile(means, [2.5, 97.5])
    return float(d.mean()), float(low), float(high)


# the 97.5% quantile of Student's t for 1..30 degrees of freedom (beyond: the normal's 1.96)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_interval(values: list[float]) -> tuple[float, float]:
    """95% interval of the mean of per-seed (or per-base) differences (Student's t): with few seeds it is
    wider than the bootstrap's, which treats the seeds it has as the whole spread of seeds."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return float("-inf"), float("inf")
    quantile = T975[len(values) - 2] if len(values) - 1 <= len(T975) else 1.96
    half = quantile * statistics.stdev(values) / len(values) ** 0.5
    return mean - half, mean + half


def sign_test(differences: list[float]) -> tuple[int, int, float]:
    """(ahead, behind, two-sided p) over seeds, ties dropped."""
    from math import comb
    ahead, behind = sum(d > 0 for d in differences), sum(d < 0 for d in differences)
    n = ahead + behind
    p = min(1.0, 2 * sum(comb(n, k) for k in range(min(ahead, behind) + 1)) / 2 ** n) if n else 1.0
    return ahead, behind, p


def comparisons(cells: list[str]) -> list[tuple[str, str]]:
    """(cell, reference): each LaX-LoRA cell against LoRA of its rank, and full fine-tuning against each LoRA."""
    pairs = [(c, lora_of(c)) for c in cells if lora_of(c)]
    pairs += [(FULL, c) for c in cells if c.startswith("lora_r") and FULL in cells]
    return [(c, ref) for c, ref in pairs if ref in cells]


def effects_table(results: dict[str, dict[int, dict]]) -> str:
    """Per test file: each cell's exact match, answer and response loss, and each comparison's paired
    exact-match difference with two 95% intervals, the bootstrap's over seeds and problems and Student's
    t over the per-seed differences (an effect only where both exclude zero), its sign test, and the
    per-seed differences of the two losses with their sign tests."""
    order = cell_order(results)
    lines = []
    some = next(iter(next(iter(results.values())).values()))
    for k, file in enumerate(some["files"]):
        lines += [f"{Path(file['file']).name} ({file['n']} problems)", "",
                  "| cell | LR | seeds | exact match % | answer loss | response loss |", "|---" * 6 + "|"]
        for cell in order:
            runs = results[cell]
            seeds = sorted(runs)
            get = lambda key: [runs[s]["files"][k][key] for s in seeds]
            lines.append(f"| {cell} | {runs[seeds[0]].get('lr', 0):g} | {len(seeds)} | "
                         f"{spread(get('accuracy'), 100)} | {spread(get('answer_loss'), 1, 3)} | "
                         f"{spread(get('response_loss'), 1, 3)} |")
        lines += ["", "| comparison | paired seeds | Δ exact match (pp) | 95% bootstrap interval | 95% t interval "
                  "over seeds | seeds ahead / behind (sign test p) | effect | Δ answer loss (seeds lower, p) | "
                  "Δ response loss (seeds lower, p) |", "|---" * 9 + "|"]
        for cell, ref in comparisons(order):
            seeds = sorted(set(results[cell]) & set(results[ref]))
            hits = lambda c: [results[c][s]["files"][k]["hits"] for s in seeds]
            mean, low, high = paired_bootstrap(hits(cell), hits(ref))
            per_seed = [results[cell][s]["files"][k]["accuracy"] - results[ref][s]["files"][k]["accuracy"]
                        for s in seeds]
            ahead, behind, p = sign_test(per_seed)
            t_low, t_high = t_interval(per_seed)
            effect = "yes" if (low > 0 and t_low > 0) or (high < 0 and t_high < 0) else "no"
            losses = []
            for key in ("answer_loss", "response_loss"):
                d = [results[cell][s]["files"][k][key] - results[ref][s]["files"][k][key] for s in seeds]
                lower, higher, p_loss = sign_test([-x for x in d])
                losses.append(f"{spread(d, 1, 3)} ({lower}/{len(seeds)}, p {p_loss:.3f})")
            lines.append(f"| {cell} − {ref} | {len(seeds)} | {100 * mean:+.1f} | "
                         f"[{100 * low:+.1f}, {100 * high:+.1f}] | [{100 * t_low:+.1f}, {100 * t_high:+.1f}] | "
                         f"{ahead} / {behind} (p {p:.3f}) | {effect} | {losses[0]} | {losses[1]} |")
        lines.append("")
    return "\n".join(lines)


# --- several bases -------------------------------------------------------------------------------------

def weight_differences(run_a: Path, run_b: Path) -> dict:
    """Two pre-trained bases (run or checkpoint directories) compared bit for bit: how many tensors and
    values they hold, and each differing tensor's largest absolute difference."""
    from ..loading.bases import load_base
    a, b = (load_base(str(run)).state_dict() for run in (run_a, run_b))
    if a.keys() != b.keys():
        raise SystemExit(f"{run_a} and {run_b} hold different tensors: not two bases of one config")
    return {"tensors": len(a), "values": sum(t.numel() for t in a.values()),
            "differing": {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}}


def read_study(out: Path) -> dict[str, dict[str, dict[int, dict]]]:
    """base -> cell -> seed -> result, from OUT/BASE/CELL/seedS/result.json (`run --bases`)."""
    bases = sorted({path.parent.parent.parent.name for path in out.glob("*/*/seed*/result.json")})
    return {base: read_results(out / base) for base in bases}


def hierarchical_bootstrap(differences: list, reps: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """Mean paired difference over bases (each base weighs the same), with a 95% percentile interval that
    resamples bases, then seeds within each drawn base, then test problems (one draw of problems per
    replicate, shared by every run, since every run answers the same problems). `differences`: one
    seeds x problems array per base. With one base it is `paired_bootstrap`'s interval."""
    import numpy as np
    per_base = [np.asarray(d, dtype=float) for d in differences]
    rng = np.random.default_rng(seed)
    n_items = per_base[0].shape[1]
    means = []
    for _ in range(reps):
        items = rng.integers(0, n_items, n_items)
        drawn = [per_base[b] for b in rng.integers(0, len(per_base), len(per_base))]
        means.append(np.mean([d[rng.integers(0, len(d), len(d))][:, items].mean() for d in drawn]))
    low, high = np.percentile(means, [2.5, 97.5])
    return float(np.mean([d.mean() for d in per_base])), float(low), float(high)


def pooled_comparison(study: dict, cell: str, ref: str, k: int) -> dict:
    """One comparison on test file k over every base that has both cells: per base, the paired seeds'
    exact-match differences (seeds x problems) and their bootstrap and t intervals; pooled, the hierarchical
    bootstrap and Student's t over the base means, and an effect only where both exclude zero."""
    import numpy as np
    per_base = {}
    for base, results in study.items():
        seeds = sorted(set(results.get(cell, {})) & set(results.get(ref, {})))
        if seeds:
            hits = lambda c: np.array([results[c][s]["files"][k]["hits"] for s in seeds], dtype=float)
            per_seed = [results[cell][s]["files"][k]["accuracy"] - results[ref][s]["files"][k]["accuracy"]
                        for s in seeds]
            answer = [results[cell][s]["files"][k]["answer_loss"] - results[ref][s]["files"][k]["answer_loss"]
                      for s in seeds]
            per_base[base] = {"d": hits(cell) - hits(ref), "per_seed": per_seed, "answer": answer,
                              "bootstrap": paired_bootstrap(hits(cell), hits(ref)), "t": t_interval(per_seed)}
    if not per_base:
        return {}
    mean, low, high = hierarchical_bootstrap([b["d"] for b in per_base.values()])
    base_means = [statistics.fmean(b["per_seed"]) for b in per_base.values()]
    t_low, t_high = t_interval(base_means)
    return {"per_base": per_base, "mean": mean, "bootstrap": (low, high), "t": (t_low, t_high),
            "base_means": base_means, "runs": [d for b in per_base.values() for d in b["per_seed"]],
            "answer": statistics.fmean(statistics.fmean(b["answer"]) for b in per_base.values()),
            "effect": (low > 0 and t_low > 0) or (high < 0 and t_high < 0)}


def pooled_table(study: dict[str, dict[str, dict[int, dict]]]) -> str:
    """Per test file: each cell's exact match pooled over bases (the mean of the base means ± their standard
    deviation: the spread a fresh base adds) and per base (mean ± standard deviation over its seeds); each
    comparison pooled over bases x seeds (`pooled_comparison`), then per base."""
    order = cell_order({c for results in study.values() for c in results})
    some = next(iter(next(iter(next(iter(study.values())).values())).values()))
    points = lambda pair: f"[{100 * pair[0]:+.1f}, {100 * pair[1]:+.1f}]"
    lines = [f"Bases: {', '.join(study)}.", ""]
    for k, file in enumerate(some["files"]):
        lines += [f"{Path(file['file']).name} ({file['n']} problems)", "",
                  "| cell | LR | bases x seeds | exact match %, over bases | per base (over seeds) | answer loss |",
                  "|---" * 6 + "|"]
        for cell in order:
            runs = {b: results[cell] for b, results in study.items() if cell in results}
            em = {b: [r[s]["files"][k]["accuracy"] for s in sorted(r)] for b, r in runs.items()}
            loss = [statistics.fmean(r[s]["files"][k]["answer_loss"] for s in r) for r in runs.values()]
            lr = next(iter(next(iter(runs.values())).values())).get("lr", 0)
            lines.append(f"| {cell} | {lr:g} | {len(runs)} x {'/'.join(str(len(v)) for v in em.values())} | "
                         f"{spread([statistics.fmean(v) for v in em.values()], 100)} | "
                         f"{' / '.join(spread(v, 100) for v in em.values())} | {spread(loss, 1, 3)} |")
        lines += ["", "| comparison | bases x seeds | Δ exact match (pp) | 95% hierarchical bootstrap (bases, seeds, "
                  "problems) | 95% t over base means | bases ahead / behind | runs ahead / behind | effect | "
                  "Δ answer loss |", "|---" * 9 + "|"]
        per_base_lines = ["", "| comparison | base | seeds | Δ exact match (pp) | 95% bootstrap (seeds, problems) | "
                          "95% t over seeds | seeds ahead / behind |", "|---" * 7 + "|"]
        for cell, ref in comparisons(order):
            c = pooled_comparison(study, cell, ref, k)
            if not c:
                continue
            ahead, behind, _ = sign_test(c["base_means"])
            runs_ahead, runs_behind, _ = sign_test(c["runs"])
            lines.append(f"| {cell} − {ref} | {len(c['per_base'])} x "
                         f"{'/'.join(str(len(b['per_seed'])) for b in c['per_base'].values())} | "
                         f"{100 * c['mean']:+.1f} | {points(c['bootstrap'])} | {points(c['t'])} | {ahead} / {behind} | "
                         f"{runs_ahead} / {runs_behind} | {'yes' if c['effect'] else 'no'} | {c['answer']:+.3f} |")
            for base, b in c["per_base"].items():
                seeds_ahead, seeds_behind, _ = sign_test(b["per_seed"])
                per_base_lines.append(f"| {cell} − {ref} | {base} | {len(b['per_seed'])} | "
                                      f"{100 * b['bootstrap'][0]:+.1f} | {points(b['bootstrap'][1:])} | "
                                      f"{points(b['t'])} | {seeds_ahead} / {seeds_behind} |")
        lines += per_base_lines + [""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_lax.finetune_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("probe", help="can the base copy numbers and complete the facts it saw?")
    p.add_argument("--base", required=True)
    p.add_argument("--max-number", type=int, default=12)
    p.add_argument("--max-factor", type=int, default=6)
    p.add_argument("--output", type=Path)
    p.add_argument("--trust-checkpoint", action="store_true", help="unpickle base files that need it (DeepSpeed's, "
                   "a pickled pytorch_model.bin); only for files you trust")
    r = commands.add_parser("run", help="fine-tune and evaluate every cell with every seed")
    r.add_argument("--config", required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--base", default="", help="overrides the config's finetune.base")
    r.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for every cell")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    r.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    r.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    r.add_argument("--no-full", action="store_true", help="leave out the full fine-tuning ceiling")
    r.add_argument("--cells", nargs="+", help="explicit cells (e.g. lora_r1 lax_linear_projection_r1 full) instead "
                                              "of ranks x methods (+ full)")
    r.add_argument("--full-lr", type=float, default=1e-3)
    r.add_argument("--lrs", type=Path, help="a `tune` directory: each cell at the rate chosen there")
    r.add_argument("--bases", nargs="+", help="several pre-trained bases: every cell and seed on each, in "
                                              "OUT/BASE_FOLDER_NAME/CELL/seedS")
    u = commands.add_parser("tune", help="choose each cell's learning rate by exact match on a selection wording")
    u.add_argument("--config", required=True)
    u.add_argument("--out", type=Path, required=True)
    u.add_argument("--base", default="", help="the selection base (never a reported one)")
    u.add_argument("--select", default=SELECTION_FILE, help="the selection file, in a wording no test file uses")
    u.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    u.add_argument("--cells", nargs="+", required=True)
    u.add_argument("--rates", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2])
    u.add_argument("--full-rates", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    u.add_argument("--seeds", type=int, nargs="+", default=[100, 101], help="selection seeds, none of them reported")
    u.add_argument("--finalists", type=int, default=2)
    w = commands.add_parser("same-weights", help="are two bases' weights identical bit for bit? (exit 1 if not)")
    w.add_argument("runs", type=Path, nargs=2)
    t = commands.add_parser("table", help="the Markdown table of a study directory")
    t.add_argument("out", type=Path)
    t.add_argument("--output", type=Path)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    if args.command == "probe":
        from ..data.tokenizer import load_tokenizer

        from ..loading.bases import base_tokenizer, load_base
        from ..parallel import trust
        from ..training import checkpoint
        try:
            with trust.trusting(everything=args.trust_checkpoint):
                model, tokenizer = load_base(args.base), load_tokenizer(base_tokenizer(args.base))
        except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        result = probe(model, tokenizer, probe_items(args.max_number, args.max_factor))
        text = json.dumps(result, indent=1)
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(text)
        print(text)
        return 0
    if args.command == "same-weights":
        from ..training import checkpoint
        try:
            found = weight_differences(*args.runs)
        except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        worst = max(found["differing"].values(), default=0.0)
        print(f"{len(found['differing'])} of {found['tensors']} tensors ({found['values']:,} values) differ"
              + (f"; largest absolute difference {worst:.3g}" if found["differing"] else ": identical bit for bit"))
        return 1 if found["differing"] else 0
    extra = dict(item.split("=", 1) for item in getattr(args, "set", []))  # run and tune: --set KEY=VALUE
    if args.command == "run":
        plan = [cell(name) for name in args.cells] if args.cells else cells(args.ranks, args.methods, not args.no_full)
        run(args.config, args.out, args.seeds, plan, args.full_lr, args.base, extra,
            chosen_rates(args.lrs) if args.lrs else None, args.bases)
        return 0
    if args.command == "tune":
        tune(args.config, args.out, [cell(name) for name in args.cells], args.rates, args.full_rates, args.seeds,
             args.finalists, args.base, extra, args.select)
        return 0
    study, results = read_study(args.out), read_results(args.out)
    with_hits = all("hits" in f for runs in results.values() for r in runs.values() for f in r["files"])
    text = pooled_table(study) if study else effects_table(results) if results and with_hits else table(args.out)
    if args.output:
        args.output.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
