"""A comparison the way a paper makes one: every variant at its own swept learning rate, several seeds,
mean and spread, and no reported number that took part in a choice.

    python -m megatron_lax.reproduce --plan configs/reproduce_small.yaml [--variants a,b] [--out DIR]
        [--quick] [--lrs 1e-3,2e-3] [--seeds 0,1] [--eta 4] [--report fresh|all]

The plan (YAML) holds `config` (a base config: `preset:` and sections, as a config file), `lrs` (the
grid every variant is swept over: a list, or a mapping of variant names, and `default`, to lists),
`rungs`/`eta`/`finalists`/`plateau` (see megatron_lax.sweep), `seeds`, `report`, `metric`, `variants`
({name: {section: {key: value}}, each with an optional `base:` naming the variant it is compared
with}), `default_variants` (what runs without --variants) and `quick` (a mapping of the same keys that
--quick puts over the plan, its `config` section by section: a cheaper protocol, written to OUT_quick
unless --out says otherwise).

For each variant: a sweep on the first seed (megatron_lax.sweep: successive halving, at least two
rates trained to the end, the choice made on the selection slice `train.select_tokens`, never on the
reported validation tokens), then the other seeds at the chosen rate (seed = train.seed and
data.seed). `report: fresh` (the default) reports only the seeds that took no part in the choice; the
sweep seed's figure is kept beside them (`sweep_seed`). `report: all` averages the sweep seed in too
(its reported tokens took no part in the choice, but its seed's luck did). `metric` is the
summary field reported (default `val_ppl`, lower is better; `val_acc1` for a ViT, higher is better).
`select` (overrides, e.g. {data: {eval_split: holdout}}) is put over the sweep's runs only: a ViT's
rates are then chosen on held-out training images while the reported seeds score the test images.
`extend_edges: N` grows a variant's grid by a factor of 2 past whichever edge wins, up to N times (a
winner at the edge was never compared with the rate beyond it); a choice still at the edge is marked. A seed whose selection loss ends
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

from ..config import Config, ConfigError, PRESETS, apply_dict, validate
from ..method.formats import FORMATS
from ..models import count_parameters, family_of
from ..tasks import task_class
from ..training.trainer import Trainer

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
        if "config" in overrides:
            overrides["config"] = over_sections(plan["config"], overrides["config"])
        plan = {**plan, **overrides, "out": overrides.get("out", str(plan.get("out", "runs/reproduce")) + "_quick")}
    return plan


def over_sections(config: dict, changes: dict) -> dict:
    """`config` with `changes` put over it section by section: a section's other keys stay."""
    merged = dict(config)
    for key, value in changes.items():
        both = isinstance(value, dict) and isinstance(config.get(key), dict)
        merged[key] = {**config[key], **value} if both else value
    return merged


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
    """Trains one seed at one learning rate (or reads the finished run back). A directory that holds
    the seed at another rate (the choice moved when the grid grew) is left alone: this rate trains in
    DIRECTORY_lr<rate>. A run stopped by a signal is not recorded: the same command resumes it."""
    from ..config import load_config

    if (directory / "config.yaml").is_file() and load_config(str(directory / "config.yaml")).optim.lr != lr:
        directory = directory.with_name(f"{directory.name}_lr{lr:g}")
    done = directory / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    run = copy.deepcopy(cfg)
    run.optim.lr, run.train.seed, run.data.seed = lr, seed, seed
    run.logging.run_dir, run.checkpoint.resume = str(directory), "auto"
    summary = Trainer(run, task_class(run)).fit()
    if summary.get("preempted"):
        raise RuntimeError(f"{directory}: stopped by a signal after step {summary['steps']}; run the same command "
                           f"again to resume")
    done.write_text(json.dumps(summary))
    return summary


def stalled(summary: dict, plateau: float) -> bool:
    """The run ended stuck at the plateau: its selection loss no better than the context-free
    baseline's by `plateau` nats (False when the run has no selection slice)."""
    loss, chance = summary.get("select_loss"), summary.get("select_chance_loss")
    return loss is not None and chance is not None and loss > chance - plateau


def run_variant(plan: dict, name: str, out: Path, log=print) -> dict:
    from .sweep import successive_halving
    from ..training.trainer import FINISHED

    cfg = variant_config(plan, name)
    m = cfg.model
    root = out / "runs" / f"{family_of(m).run_prefix}{m.method}" \
                          f"{'_lax-' + m.lax_gate if m.uses_lax else ''}-{run_key(cfg)}"
    first, *others = plan["seeds"]
    swept = copy.deepcopy(cfg)
    apply_dict(swept, plan.get("select") or {}, source="plan select")
    swept.train.seed = swept.data.seed = first
    task = task_class(cfg)  # names the plan's metric and its baseline
    plateau, metric = plan.get("plateau", 0.1), plan.get("metric") or task.headline_metric[0]
    lrs = grid(plan, name)
    sweep = successive_halving(swept, lrs, root / "sweep", plan.get("rungs", 3), plan.get("eta", 2), log,
                               plan.get("finalists", 2), plateau)
    for _ in range(plan.get("extend_edges", 0)):  # a winner at the grid's edge is not a choice yet
        if sweep["best_lr"] not in (lrs[0], lrs[-1]) or len(lrs) < 2:
            break
        lrs = sorted(lrs + [lrs[-1] * 2 if sweep["best_lr"] == lrs[-1] else lrs[0] / 2])
        log(f"{name}: best rate {sweep['best_lr']:g} is at the grid's edge; sweeping {', '.join(f'{v:g}' for v in lrs)}")
        sweep = successive_halving(swept, lrs, root / "sweep", plan.get("rungs", 3), plan.get("eta", 2), log,
                                   plan.get("finalists", 2), plateau)
    summaries = {first: json.loads((Path(sweep["best_run"]) / FINISHED).read_text())}
    for seed in others:
        summaries[seed] = run_seed(cfg, sweep["best_lr"], seed, root / f"seed{seed}")
        log(f"{name}: seed {seed} at lr {sweep['best_lr']:g}: {metric} {summaries[seed][metric]:.4g}")
    reported = [s for s in summaries if plan.get("report", "fresh") == "all" or s != first] or [first]
    values = [summaries[s][metric] for s in reported]
    complete_shape(cfg.model, root)
    title, higher_is_better = task.metric_titles.get(metric, (metric, False))
    baseline, baseline_title = task.baseline_metric
    return {"variant": name, "base": plan["variants"][name].get("base"), "lr": sweep["best_lr"], "metric": metric,
            "metric_title": title, "higher_is_better": higher_is_better,
            "lrs": lrs, "lr_at_edge": len(lrs) > 1 and sweep["best_lr"] in (lrs[0], lrs[-1]),
            "values": {str(s): summaries[s][metric] for s in reported}, "sweep_seed": first,
            "sweep_seed_value": summaries[first][metric], "sweep_seed_reported": first in reported,
            "stalled": sum(stalled(summaries[s], plateau) for s in reported), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values),
            "params": count_parameters(cfg.model), "sweep": sweep, "runs": str(root),
            "baseline": {baseline: summaries[first].get(baseline, math.nan)} if baseline else {},
            "baseline_title": baseline_title}


def complete_shape(m, root: Path) -> None:
    """Fills the model fields that follow the data (Family.data_fields: a vocabulary, classes) from one
    of the variant's runs under `root`, for its parameter count."""
    from ..config import load_config
    run = load_config(str(next(root.rglob("config.yaml")))).model
    for field in family_of(m).data_fields:
        setattr(m, field, getattr(m, field) or getattr(run, field))


def variant_family_label(variant: str) -> str:
    """"svd_lax.depth8" -> "SVD + LaX": the format's label (a name no format has is kept as it is)."""
    name = variant.split(".")[0]
    method = name.removesuffix("_lax")
    label = FORMATS[method].label if method in FORMATS else method
    return label + (" + LaX" if name.endswith("_lax") else "")


def lax_effects(results: list[dict], setting_of, sweep_seed: bool = False) -> dict[str, list[tuple]]:
    """{method: [(setting, change %, error %), ...]}: each LaX variant against its base among `results`.

    The change is of the reported mean (negative: LaX lowers the metric); with `sweep_seed` it is of
    the sweep seed's run instead, so that settings measured with different numbers of seeds are
    compared like with like. The error is half of each min-max range added (zero for one seed).
    `setting_of(result)` gives the x value, e.g. the variant's depth. A variant listed twice counts
    once, as its last entry."""
    by_name = {r["variant"]: r for r in results}
    lines: dict[str, list[tuple]] = {}
    for r in by_name.values():
        base = by_name.get(r.get("base"))
        if base is None or "lax" not in r["variant"]:
            continue
        if sweep_seed:
            change, error = 100 * (r["sweep_seed_value"] / base["sweep_seed_value"] - 1), 0.0
        else:
            change = 100 * (r["mean"] / base["mean"] - 1)
            error = 100 * ((r["max"] - r["min"]) / 2 + (base["max"] - base["min"]) / 2) / base["mean"]
        lines.setdefault(variant_family_label(r["variant"]), []).append((setting_of(r), change, error))
    return {m: sorted(p) for m, p in lines.items()}


def results_table(results: list[dict]) -> str:
    by_name = {r["variant"]: r for r in results}
    label, higher_is_better = (results[0]["metric_title"], results[0]["higher_is_better"]) if results else ("", False)
    lines = [f"| variant | LR | {label}, mean ± std | min - max | stalled | vs base (mean) | sweep seed | params (M) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        n = len(r["values"])
        base = by_name.get(r["base"]) if r["base"] else None
        delta = "-"
        if base and higher_is_better:
            delta = f"{r['mean'] - base['mean']:+.2f} points vs {base['variant']}"
        elif base:
            delta = f"{r['mean'] - base['mean']:+.2f} ({100 * (r['mean'] / base['mean'] - 1):+.1f}%) vs {base['variant']}"
        sweep_seed = f"{r['sweep_seed_value']:.2f}" + (" (in the mean)" if r["sweep_seed_reported"] else "")
        lr = f"{r['lr']:g}" + (" (edge)" if r.get("lr_at_edge") else "")
        lines.append(f"| {r['variant']} | {lr} | {r['mean']:.2f} ± {r['std']:.2f} (n={n}) | "
                     f"{r['min']:.2f} - {r['max']:.2f} | {r['stalled']}/{n} | {delta} | {sweep_seed} | "
                     f"{r['params'] / 1e6:.3f} |")
    baselines = [(r["baseline_title"], v) for r in results for v in r["baseline"].values() if math.isfinite(v)]
    if baselines:
        what, value = baselines[0]
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
    parser.add_argument("--report", choices=("fresh", "all"), help="replaces the plan's report")
    parser.add_argument("--extend-edges", type=int, help="replaces the plan's extend_edges")
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
        if args.extend_edges is not None:
            plan["extend_edges"] = args.extend_edges
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
