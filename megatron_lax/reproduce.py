"""A comparison the way a paper makes one: every variant at its own swept learning rate, several seeds,
mean and spread.

    python -m megatron_lax.reproduce --plan configs/reproduce_small.yaml [--variants a,b] [--out DIR]
        [--lrs 1e-3,2e-3] [--seeds 0,1] [--eta 4]     (a cheaper protocol; use another --out)

The plan (YAML) holds `config` (a base config: `preset:` and sections, as a config file), `lrs` (the
grid every variant is swept over), `rungs`/`eta` (see megatron_lax.sweep), `seeds`, `variants`
({name: {section: {key: value}}, each with an optional `base:` naming the variant it is compared
with}) and `default_variants` (what runs without --variants). For each variant: a successive-halving
sweep on the first seed (megatron_lax.sweep), whose best run is that seed's run, then the other seeds
at the best learning rate (seed = train.seed and data.seed). Results go to OUT/results.json and
OUT/results.md; runs live under OUT/runs/, named by a digest of the variant's resolved settings, so
variants (of this plan or another) that resolve to the same settings share their finished runs.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import yaml

from .config import Config, ConfigError, PRESETS, apply_dict, validate
from .models import count_parameters

# What a plan's `metric` reads from each run, how it is named, whether higher is better, and the
# baseline each run logs beside it.
METRICS = {"val_ppl": ("val PPL", False, "unigram_ppl"), "val_loss": ("val loss", False, "unigram_ppl"),
           "val_acc1": ("top-1 accuracy (%)", True, "chance_acc1")}


def load_plan(path: Path) -> dict:
    try:
        plan = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"plan {path}: {str(e).splitlines()[0]}") from None
    for key in ("config", "lrs", "seeds", "variants"):
        if not isinstance(plan, dict) or key not in plan:
            raise ConfigError(f"plan {path}: missing `{key}`")
    return plan


def variant_config(plan: dict, name: str) -> Config:
    """The plan's base config with the variant's settings; model.lowrank_init `auto` resolved, so
    that equal settings give equal run names."""
    if name not in plan["variants"]:
        raise ConfigError(f"unknown variant {name!r} (the plan has {', '.join(plan['variants'])})")
    cfg = Config()
    base = copy.deepcopy(plan["config"])
    preset = base.pop("preset", None)
    if preset:
        apply_dict(cfg, PRESETS[preset], source=preset)
    apply_dict(cfg, base, source="plan config")
    apply_dict(cfg, {k: v for k, v in plan["variants"][name].items() if k != "base"}, source=f"variant {name}")
    cfg.model.lowrank_init = cfg.model.resolved_lowrank_init
    validate(cfg)
    return cfg


def run_key(cfg: Config) -> str:
    """A short digest of everything that shapes a pre-training run except its seed, LR and directory
    (the fine-tuning sections do not, so they are left out)."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("lora", "finetune")}
    for section, key in (("logging", "run_dir"), ("train", "seed"), ("data", "seed"), ("optim", "lr")):
        settings[section].pop(key)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def run_seed(cfg: Config, lr: float, seed: int, directory: Path) -> dict:
    """Trains one seed at one learning rate (or reads the finished run back)."""
    from .train import trainer_for

    done = directory / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    run = copy.deepcopy(cfg)
    run.optim.lr, run.train.seed, run.data.seed = lr, seed, seed
    run.logging.run_dir, run.checkpoint.resume = str(directory), "auto"
    summary = trainer_for(run)(run).fit()
    done.write_text(json.dumps(summary))
    return summary


def run_variant(plan: dict, name: str, out: Path, log=print) -> dict:
    """The variant's sweep on the first seed, then its reported seeds at the chosen rate. With a plan's
    `select` (overrides such as {data: {eval_split: holdout}}) the sweep is scored on data that is
    never reported; with `report_seeds` the reported seeds are others than the sweep's, so no reported
    run took part in the choice."""
    from .sweep import successive_halving

    cfg = variant_config(plan, name)
    m = cfg.model
    metric = plan.get("metric", "val_ppl")
    root = out / "runs" / f"{m.arch + '_' if m.arch != 'llama' else ''}{m.method}" \
                          f"{'_lax-' + m.lax_gate if m.uses_lax else ''}-{run_key(cfg)}"
    first, *others = plan["seeds"]
    swept = copy.deepcopy(cfg)
    apply_dict(swept, plan.get("select") or {}, source="plan select")
    swept.train.seed = swept.data.seed = first
    sweep = successive_halving(swept, [float(v) for v in plan["lrs"]], root / "sweep", plan.get("rungs", 3),
                               plan.get("eta", 2), log)
    best = Path(sweep["best_run"])
    values = {} if plan.get("report_seeds") else {first: _last_logged(best, metric)}
    for seed in plan.get("report_seeds") or others:
        values[seed] = run_seed(cfg, sweep["best_lr"], seed, root / f"seed{seed}")[metric]
        log(f"{name}: seed {seed} at lr {sweep['best_lr']:g}: {metric} {values[seed]:.2f}")
    numbers = list(values.values())
    if m.arch == "llama":
        cfg.model.vocab_size = cfg.model.vocab_size or _vocab(root)
    else:
        cfg.model.num_classes, cfg.model.in_channels = _image_shape(root)
    baseline_key = METRICS[metric][2]
    return {"variant": name, "base": plan["variants"][name].get("base"), "lr": sweep["best_lr"], "metric": metric,
            "values": {str(k): v for k, v in values.items()}, "mean": statistics.fmean(numbers),
            "std": statistics.stdev(numbers) if len(numbers) > 1 else 0.0, "min": min(numbers), "max": max(numbers),
            "params": count_parameters(cfg.model), "sweep": sweep, "runs": str(root),
            "baseline": {baseline_key: _last_logged(best, baseline_key)}}


def _last_logged(run_dir: Path, key: str) -> float:
    """The last value of `key` in the run's metrics.jsonl (NaN if it was never logged)."""
    from .compare import read_records
    found = [r[key] for r in read_records(run_dir / "metrics.jsonl")[0] if key in r]
    return found[-1] if found else math.nan


def _vocab(root: Path) -> int:
    from .config import load_config
    return load_config(str(next(root.rglob("config.yaml")))).model.vocab_size


def _image_shape(root: Path) -> tuple[int, int]:
    from .config import load_config
    model = load_config(str(next(root.rglob("config.yaml")))).model
    return model.num_classes, model.in_channels


def results_table(results: list[dict]) -> str:
    by_name = {r["variant"]: r for r in results}
    metric = results[0].get("metric", "val_ppl")
    label, higher_is_better, _ = METRICS[metric]
    lines = [f"| variant | LR | {label}, mean ± std | min - max | vs base (mean) | params (M) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        n = len(r["values"])
        base = by_name.get(r["base"]) if r["base"] else None
        delta = "-"
        if base and higher_is_better:
            delta = f"{r['mean'] - base['mean']:+.2f} points vs {base['variant']}"
        elif base:
            delta = f"{r['mean'] - base['mean']:+.2f} ({100 * (r['mean'] / base['mean'] - 1):+.1f}%) vs {base['variant']}"
        lines.append(f"| {r['variant']} | {r['lr']:g} | {r['mean']:.2f} ± {r['std']:.2f} (n={n}) | "
                     f"{r['min']:.2f} - {r['max']:.2f} | {delta} | {r['params'] / 1e6:.3f} |")
    baselines = [(k, v) for r in results for k, v in r.get("baseline", {}).items() if math.isfinite(v)]
    if baselines:
        key, value = baselines[0]
        what = "Unigram baseline" if key == "unigram_ppl" else "Chance"
        lines.append(f"\n{what} on the same validation data: {value:.2f}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_lax.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--variants", help="comma-separated names (default: the plan's default_variants)")
    parser.add_argument("--out", type=Path, help="output directory (default: the plan's `out`)")
    parser.add_argument("--lrs", help="comma-separated learning rates, replacing the plan's grid")
    parser.add_argument("--seeds", help="comma-separated seeds, replacing the plan's")
    parser.add_argument("--eta", type=int, help="replaces the plan's eta")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        plan = load_plan(args.plan)
        if args.lrs:
            plan["lrs"] = [float(v) for v in args.lrs.split(",")]
        if args.seeds:
            plan["seeds"] = [int(v) for v in args.seeds.split(",")]
        if args.eta:
            plan["eta"] = args.eta
        names = args.variants.split(",") if args.variants else plan.get("default_variants", list(plan["variants"]))
        out = args.out or Path(plan.get("out", "runs/reproduce"))
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            variant_config(plan, name)  # refuse a bad plan before training anything
        log = lambda m: print(m, file=sys.stderr, flush=True)
        results = [run_variant(plan, name, out, log) for name in names]
    except (ConfigError, ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = results_table(results)
    stem = "results" if not args.variants else "results-" + "-".join(names)[:80]
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out / f"{stem}.md").write_text(table + f"\n\nWall time {time.time() - start:.0f} s.\n")
    print(table)
    print(f"\nwall time {time.time() - start:.0f} s; {out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
