"""Learning-rate sweep: the paper's rule ("the largest learning rate that does not diverge", Table 14's
note) as a tool, with successive halving so that a grid costs about two full runs:

    python -m megatron_lax.sweep --config FILE [--section.key value ...] --lrs 1e-3,2e-3,4e-3,8e-3 --out DIR
    python -m megatron_lax.sweep ... --lr-range 1e-3:3e-2:6      (6 log-spaced values from 1e-3 to 3e-2)

Every learning rate trains with the full schedule of the run it stands for (warmup and cosine over
train.steps). The runs are paused at rung boundaries (halvings: by default 1/4 and 1/2 of the steps), compared on
validation loss, and only the best 1/eta of them (rounded up) continue; a run whose training loss turns
non-finite or rises above its first step's loss is stopped at once and marked diverged. Since a
paused run resumes exactly, the winner's run is an ordinary complete run at its learning rate.

DIR/lr_<value>/ holds each run; DIR/sweep.json the results; DIR/sweep.md a table; DIR/sweep.png the
validation loss against the learning rate at every rung. `--best` prints only the best learning rate.
Finished rungs are not repeated when the command is run again.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
from pathlib import Path

from .config import Config, ConfigError, add_config_arguments, config_from_args


def log_spaced(low: float, high: float, points: int) -> list[float]:
    if points < 2:
        return [low]
    ratio = (high / low) ** (1 / (points - 1))
    return [float(f"{low * ratio ** i:.3g}") for i in range(points)]


def parse_lrs(lrs: str | None, lr_range: str | None) -> list[float]:
    if lrs:
        values = [float(v) for v in lrs.split(",") if v.strip()]
    elif lr_range:
        try:
            low, high, points = lr_range.split(":")
            values = log_spaced(float(low), float(high), int(points))
        except ValueError:
            raise ConfigError(f"--lr-range {lr_range!r} must look like LOW:HIGH:POINTS, e.g. 1e-3:3e-2:6") from None
    else:
        raise ConfigError("give --lrs or --lr-range")
    if not values or any(v <= 0 for v in values):
        raise ConfigError("learning rates must be positive")
    return sorted(set(values))


def rung_steps(total: int, rungs: int) -> list[int]:
    """Pause points at halvings of the run: total / 2^(rungs-1), ..., total / 2, total."""
    return sorted({max(1, total // 2 ** k) for k in range(rungs)})


def run_dir(out: Path, lr: float) -> Path:
    return out / f"lr_{lr:g}"


def train_until(cfg: Config, lr: float, stop_after: int, out: Path) -> dict:
    """Trains (or resumes) the run of this learning rate up to step stop_after; returns
    {"step", "diverged", "val_loss": {step: loss}}. A rung already reached is read back, not trained again."""
    from .train import trainer_for

    directory = run_dir(out, lr)
    state_file = directory / "sweep_state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"step": 0, "diverged": False, "val_loss": {}}
    if state["diverged"] or state["step"] >= stop_after:
        return state
    run = copy.deepcopy(cfg)
    run.optim.lr = lr
    run.logging.run_dir = str(directory)
    run.train.stop_if_diverged = True
    run.train.stop_after = stop_after
    run.checkpoint.resume = "auto"
    run.checkpoint.keep = 1
    summary = trainer_for(run)(run).fit()
    state["step"], state["diverged"] = summary["steps"], bool(summary.get("diverged"))
    state["val_loss"][str(stop_after)] = math.inf if state["diverged"] else summary["val_loss"]
    state_file.write_text(json.dumps(state))
    return state


def val_loss_at(state: dict, step: int) -> float:
    """The run's validation loss at a pause point; inf once it has diverged."""
    return math.inf if state["diverged"] else state["val_loss"].get(str(step), math.inf)


def successive_halving(cfg: Config, lrs: list[float], out: Path, rungs: int = 3, eta: int = 2, log=print) -> dict:
    """{"best_lr", "rungs": [step, ...], "results": {lr: {rung step: val_loss or inf}}}."""
    from .train import planned_total_steps

    total = planned_total_steps(cfg)
    stops = rung_steps(total, rungs)
    results: dict[float, dict[int, float]] = {lr: {} for lr in lrs}
    alive = list(lrs)
    for k, stop in enumerate(stops):
        for lr in alive:
            state = train_until(cfg, lr, stop, out)
            results[lr][stop] = val_loss_at(state, stop)
            status = "diverged" if state["diverged"] else f"val loss {results[lr][stop]:.4f}"
            log(f"sweep: lr {lr:g} step {stop}/{total}: {status}")
        if k < len(stops) - 1:
            keep = max(1, math.ceil(len(alive) / eta))
            alive = sorted(alive, key=lambda lr: results[lr][stop])[:keep]
            alive = [lr for lr in alive if math.isfinite(results[lr][stop])] or alive[:1]
    finals = {lr: results[lr][stops[-1]] for lr in alive}
    best = min(finals, key=finals.get)
    if not math.isfinite(finals[best]):
        raise RuntimeError(f"every learning rate of {lrs} diverged; try smaller ones")
    return {"best_lr": best, "best_run": str(run_dir(out, best)), "total_steps": total, "rungs": stops,
            "results": {f"{lr:g}": {str(s): v for s, v in r.items()} for lr, r in results.items()}}


def table(result: dict) -> str:
    stops = result["rungs"]
    lines = ["| LR | " + " | ".join(f"val loss @ {s}" for s in stops) + " |", "|---|" + "---|" * len(stops)]
    for lr, by_step in result["results"].items():
        cells = []
        for s in stops:
            v = by_step.get(str(s))
            cells.append("-" if v is None else ("diverged" if not math.isfinite(v) else f"{v:.4f}"))
        mark = " (best)" if float(lr) == result["best_lr"] else ""
        lines.append(f"| {lr}{mark} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, output: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in result["rungs"]:
        points = [(float(lr), by[str(s)]) for lr, by in result["results"].items()
                  if str(s) in by and math.isfinite(by[str(s)])]
        if points:
            ax.plot(*zip(*sorted(points)), marker="o", label=f"step {s}")
        diverged = [float(lr) for lr, by in result["results"].items() if str(s) in by and not math.isfinite(by[str(s)])]
        if diverged and points:
            ax.scatter(diverged, [max(v for _, v in points)] * len(diverged), marker="x", color="red")
    ax.set(xscale="log", xlabel="peak learning rate", ylabel="validation loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_lax.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--lrs", help="comma-separated peak learning rates")
    parser.add_argument("--lr-range", help="LOW:HIGH:POINTS, log-spaced")
    parser.add_argument("--out", type=Path, required=True, help="sweep directory")
    parser.add_argument("--rungs", type=int, default=3, help="pause points, including the end (default: 3)")
    parser.add_argument("--eta", type=int, default=2, help="keep the best 1/eta at each pause (default: 2)")
    parser.add_argument("--best", action="store_true", help="print only the best learning rate")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        lrs = parse_lrs(args.lrs, args.lr_range)
        args.out.mkdir(parents=True, exist_ok=True)
        log = (lambda _: None) if args.best else (lambda m: print(m, file=sys.stderr))
        result = successive_halving(cfg, lrs, args.out, args.rungs, args.eta, log)
    except (ConfigError, ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (args.out / "sweep.json").write_text(json.dumps(result, indent=1))
    (args.out / "sweep.md").write_text(table(result) + "\n")
    plot(result, args.out / "sweep.png", f"{cfg.model.method}, lax_gate {cfg.model.lax_gate}")
    if args.best:
        print(f"{result['best_lr']:g}")
    else:
        print(table(result))
        print(f"\nbest learning rate {result['best_lr']:g}: {result['best_run']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
