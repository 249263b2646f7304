"""A comparison the way a paper makes one: every variant at its own swept learning rate, several seeds,
mean and spread, and no reported number that took part in a choice.

    python -m megatron_lax.reproduce --plan configs/reproduce_small.yaml [--variants a,b] [--out DIR]
        [--quick] [--lrs 1e-3,2e-3] [--seeds 0,1] [--eta 4] [--report fresh|all]

The plan (YAML) holds `config` (a base config: `preset:` and sections, as a config file), `lrs` (the
grid every variant is swept over: a list, or a mapping of variant names, and `default`, to lists),
`rungs`/`eta`/`finalists`/`plateau` (see megatron_lax.sweep), `seeds`, `report`, `metric`, `variants`
({name: {section: {key: value}}, each with an optional `base:` naming the variant it is compared
with}), `default_variants` (what runs without --variants) and `quick` (a mapping of the same keys that
--quick puts over the plan: a cheaper protocol, written to OUT_quick unless --out says otherwise).

For each variant: a sweep on the first seed (megatron_lax.sweep: successive halving, at least two
rates trained to the end, the choice made on the selection slice `train.select_tokens`, never on the
reported validation tokens), then the other seeds at the chosen rate (seed = train.seed and
data.seed). `report: fresh` (the default) reports only the seeds that took no part in the choice; the
sweep seed's figure is kept beside them (`sweep_seed`). `report: all` averages the sweep seed in too
(its reported tokens took no part in the choice, but its seed's luck did). `metric` is the
summary field reported (default `val_ppl`, lower is better). A seed whose selection loss ends
within `plateau` nats of the context-free baseline counts as stalled; the table gives the count.

Results go to OUT/results.json and OUT/results.md; runs live under OUT/runs/, named by a digest of the
variant's resolved settings, so variants (of this plan or another, quick or not) that resolve to the
same settings share their finished runs.
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
from .models.llama import count_parameters


def load_plan(path: Path, quick: bool = False) -> dict:
    try:
        plan = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"plan {path}: {str(e).splitlines()[0]}") from None
    for key in ("config", "lrs", "seeds", "variants"):
        if not isinstance(plan, dict) or key not in plan:
            raise ConfigError(f"plan {path}: missing `{key}`")
    if plan.get("report", "fresh") not in ("fresh", "all"):
        raise ConfigError(f"plan {path}: `report` must be fresh or all, not {plan['report']!r}")
    if quick:
        if not isinstance(plan.get("quick"), dict):
            raise ConfigError(f"plan {path}: --quick needs a `quick:` mapping in the plan")
        overrides = dict(plan["quick"])
        if "variants" in overrides:
            overrides["default_variants"] = overrides.pop("variants")
        plan = {**plan, **overrides, "out": overrides.get("out", str(plan.get("out", "runs/reproduce")) + "_quick")}
    return plan


def grid(plan: dict, name: str) -> list[float]:
    """The learning rates a variant is swept over: the plan's list, or its entry in a mapping."""
    lrs = plan["lrs"]
    if isinstance(lrs, dict):
        lrs = lrs.get(name, lrs.get("default"))
        if lrs is None:
            raise ConfigError(f"the plan's `lrs` has no grid for {name!r} and no `default`")
    return sorted(float(v) for v in lrs)


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
    from .train import Trainer

    done = directory / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    run = copy.deepcopy(cfg)
    run.optim.lr, run.train.seed, run.data.seed = lr, seed, seed
    run.logging.run_dir, run.checkpoint.resume = str(directory), "auto"
    summary = Trainer(run).fit()
    done.write_text(json.dumps(summary))
    return summary


def stalled(summary: dict, plateau: float) -> bool:
    """The run ended stuck at the plateau: its selection loss no better than the context-free
    baseline's by `plateau` nats (False when the run has no selection slice)."""
    loss, chance = summary.get("select_loss"), summary.get("select_chance_loss")
    return loss is not None and chance is not None and loss > chance - plateau


def run_variant(plan: dict, name: str, out: Path, log=print) -> dict:
    from .sweep import successive_halving
    from .train import FINISHED

    cfg = variant_config(plan, name)
    m = cfg.model
    root = out / "runs" / f"{m.method}{'_lax-' + m.lax_gate if m.uses_lax else ''}-{run_key(cfg)}"
    first, *others = plan["seeds"]
    swept = copy.deepcopy(cfg)
    swept.train.seed = swept.data.seed = first
    plateau, metric = plan.get("plateau", 0.1), plan.get("metric", "val_ppl")
    sweep = successive_halving(swept, grid(plan, name), root / "sweep", plan.get("rungs", 3), plan.get("eta", 2),
                               log, plan.get("finalists", 2), plateau)
    summaries = {first: json.loads((Path(sweep["best_run"]) / FINISHED).read_text())}
    for seed in others:
        summaries[seed] = run_seed(cfg, sweep["best_lr"], seed, root / f"seed{seed}")
        log(f"{name}: seed {seed} at lr {sweep['best_lr']:g}: {metric} {summaries[seed][metric]:.4g}")
    reported = [s for s in summaries if plan.get("report", "fresh") == "all" or s != first] or [first]
    values = [summaries[s][metric] for s in reported]
    cfg.model.vocab_size = cfg.model.vocab_size or _vocab(root)
    return {"variant": name, "base": plan["variants"][name].get("base"), "lr": sweep["best_lr"], "metric": metric,
            "values": {str(s): summaries[s][metric] for s in reported}, "sweep_seed": first,
            "sweep_seed_value": summaries[first][metric], "sweep_seed_reported": first in reported,
            "stalled": sum(stalled(summaries[s], plateau) for s in reported), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values),
            "params": count_parameters(cfg.model), "sweep": sweep, "runs": str(root),
            "unigram_ppl": summaries[first].get("unigram_ppl", math.nan)}


def _vocab(root: Path) -> int:
    from .config import load_config
    return load_config(str(next(root.rglob("config.yaml")))).model.vocab_size


def results_table(results: list[dict]) -> str:
    by_name = {r["variant"]: r for r in results}
    metric = results[0]["metric"] if results else "val_ppl"
    lines = [f"| variant | LR | {metric}, mean ± std | min - max | stalled | vs base (mean) | sweep seed | params (M) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        n = len(r["values"])
        base = by_name.get(r["base"]) if r["base"] else None
        delta = f"{r['mean'] - base['mean']:+.2f} ({100 * (r['mean'] / base['mean'] - 1):+.1f}%) vs {base['variant']}" \
            if base else "-"
        sweep_seed = f"{r['sweep_seed_value']:.2f}" + (" (in the mean)" if r["sweep_seed_reported"] else "")
        lines.append(f"| {r['variant']} | {r['lr']:g} | {r['mean']:.2f} ± {r['std']:.2f} (n={n}) | "
                     f"{r['min']:.2f} - {r['max']:.2f} | {r['stalled']}/{n} | {delta} | {sweep_seed} | "
                     f"{r['params'] / 1e6:.3f} |")
    unigram = next((r["unigram_ppl"] for r in results if math.isfinite(r.get("unigram_ppl", math.nan))), None)
    if unigram:
        lines.append(f"\nUnigram baseline on the same validation tokens: {unigram:.2f}.")
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
    parser.add_argument("--report", choices=("fresh", "all"), help="replaces the plan's report")
    parser.add_argument("--quick", action="store_true",
                        help="the plan's cheaper `quick` protocol (what it gives up: docs/RESULTS.md)")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        plan = load_plan(args.plan, args.quick)
        if args.lrs:
            plan["lrs"] = [float(v) for v in args.lrs.split(",")]
        if args.seeds:
            plan["seeds"] = [int(v) for v in args.seeds.split(",")]
        if args.eta:
            plan["eta"] = args.eta
        if args.report:
            plan["report"] = args.report
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
