"""Learning-rate sweep: successive halving that ends with a choice between rates trained to the end.

    python -m megatron_lax.sweep --config FILE [--section.key value ...] --lrs 1e-3,2e-3,4e-3,8e-3 --out DIR
    python -m megatron_lax.sweep ... --lr-range 1e-3:3e-2:6      (6 log-spaced values from 1e-3 to 3e-2)

The rule: **the lowest selection loss at full length among the rates that neither diverged nor
stalled**. (Table 14's note says the paper took "the largest rate that does not diverge"; this
tool does not, because at small scale the largest surviving rate is often far from the best one,
docs/RESULTS.md.) In detail:

- Every rate trains with the full schedule of the run it stands for (warmup and cosine over
  train.steps). Runs are paused at rung boundaries (halvings: by default 1/4 and 1/2 of the steps),
  ranked by selection loss, and the best 1/eta of them (rounded up), but never fewer than
  `--finalists` (default 2), continue; so at least two rates reach the end and the choice is made
  between complete runs, not at a fraction of the schedule where the learning rate is still high
  and smaller rates look better.
- The selection loss is measured on the selection slice (`train.select_tokens` of validation
  sequences after the `train.eval_tokens` that are reported), so no reported token takes part in the
  choice. Without a selection slice the sweep falls back to the reported validation loss and says
  so (sweep.json `selected_on`).
- Diverged: the training loss turned non-finite or spiked (its moving average rose more than
  `train.divergence_spike` nats above its running best; megatron_lax.train); the run stops at once.
- Stalled: at a pause or at the end, the selection loss is within `--plateau` nats (default 0.1) of a
  context-free baseline on the same tokens (the unigram model for a language model): the run is stuck
  at the plateau and is dropped.

Since a paused run resumes exactly, every finalist's run is an ordinary complete run at its rate.
DIR/lr_<value>/ holds each run; DIR/sweep.json the results; DIR/sweep.md a table; DIR/sweep.png the
selection loss against the learning rate at every rung. `--best` prints only the best learning
rate. Finished rungs are not repeated when the command is run again.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

from ..config import Config, ConfigError, add_config_arguments, config_from_args
from ..tasks import task_class
from ..training.trainer import Trainer


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
    {"step", "diverged", "val_loss": {step: loss}, "select_loss": {step: loss}, "chance_loss"}. A rung
    already reached is read back, not trained again; a run stopped by a signal raises (its checkpoint
    is there: the same command resumes it)."""
    directory = run_dir(out, lr)
    state_file = directory / "sweep_state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    state = {"step": 0, "diverged": False, "val_loss": {}, "select_loss": {}, "chance_loss": None, **state}
    if state["diverged"] or state["step"] >= stop_after:
        return state
    run = copy.deepcopy(cfg)
    run.optim.lr = lr
    run.logging.run_dir = str(directory)
    run.train.stop_if_diverged = True
    run.train.stop_after = stop_after
    run.checkpoint.resume = "auto"
    run.checkpoint.keep = 1
    summary = Trainer(run, task_class(run)).fit()
    if summary.get("preempted"):
        raise RuntimeError(f"{directory}: stopped by a signal after step {summary['steps']}; run the same command "
                           f"again to resume")
    state["step"], state["diverged"] = summary["steps"], bool(summary.get("diverged"))
    if not state["diverged"]:
        state["val_loss"][str(stop_after)] = summary["val_loss"]
        if "select_loss" in summary:
            state["select_loss"][str(stop_after)] = summary["select_loss"]
        state["chance_loss"] = summary.get("select_chance_loss", state["chance_loss"])
    state_file.write_text(json.dumps(state))
    return state


def selection_loss(state: dict, step: int) -> float:
    """The loss the sweep ranks by at a pause point: the selection slice's when the run has one, else
    the (reported) validation loss; inf once the run has diverged."""
    if state["diverged"]:
        return math.inf
    return state["select_loss"].get(str(step), state["val_loss"].get(str(step), math.inf))


def status_at(state: dict, step: int, plateau: float) -> str:
    """`diverged`, `stalled` (no better than the context-free baseline by `plateau` nats) or `ok`."""
    if state["diverged"]:
        return "diverged"
    loss, chance = selection_loss(state, step), state.get("chance_loss")
    if not math.isfinite(loss) or (chance is not None and loss > chance - plateau):
        return "stalled"
    return "ok"


def successive_halving(cfg: Config, lrs: list[float], out: Path, rungs: int = 3, eta: int = 2, log=print,
                       finalists: int = 2, plateau: float = 0.1) -> dict:
    """{"best_lr", "rungs": [step, ...], "results": {lr: {rung step: selection loss or inf}},
    "status": {lr: ok | stalled at N | diverged at N}, "finalists": [lr, ...], "selected_on": ...}."""
    if finalists < 1 or eta < 1:
        raise ConfigError("--finalists and --eta must be at least 1")
    total = task_class(cfg).planned_steps(cfg)
    stops = rung_steps(total, rungs)
    selected_on = (f"selection slice: {cfg.train.select_tokens} validation tokens after the reported ones"
                   if cfg.train.select_tokens else "the reported validation tokens (train.select_tokens is 0)")
    if cfg.data.eval_split == "holdout":
        selected_on = f"{cfg.data.holdout} training samples held out of training (data.eval_split holdout)"
    elif not cfg.train.select_tokens:
        log("sweep: warning: no selection slice (train.select_tokens 0): choosing on the reported validation "
            "loss, and the plateau rule is off")
    results: dict[float, dict[int, float]] = {lr: {} for lr in lrs}
    reported: dict[float, dict[int, float]] = {lr: {} for lr in lrs}
    status: dict[float, str] = {lr: "ok" for lr in lrs}
    alive = list(lrs)
    for k, stop in enumerate(stops):
        for lr in alive:
            state = train_until(cfg, lr, stop, out)
            results[lr][stop] = selection_loss(state, stop)
            reported[lr][stop] = state["val_loss"].get(str(stop), math.inf)
            now = status_at(state, stop, plateau)
            if now != "ok":
                status[lr] = f"{now} at step {state['step'] if now == 'diverged' else stop}"
            log(f"sweep: lr {lr:g} step {stop}/{total}: " +
                (status[lr] if now != "ok" else f"selection loss {results[lr][stop]:.4f}"))
        eligible = sorted((lr for lr in alive if status[lr] == "ok"), key=lambda lr: results[lr][stop])
        if not eligible:
            raise RuntimeError(f"every learning rate of {lrs} diverged or stalled by step {stop}; try others")
        if k < len(stops) - 1:
            alive = eligible[:max(math.ceil(len(alive) / eta), finalists)]
        else:
            alive = eligible
    best = alive[0]
    return {"best_lr": best, "best_run": str(run_dir(out, best)), "total_steps": total, "rungs": stops,
            "finalists": [f"{lr:g}" for lr in alive], "selected_on": selected_on,
            "rule": "lowest selection loss at full length among rates that neither diverged nor stalled",
            "results": {f"{lr:g}": {str(s): v for s, v in r.items()} for lr, r in results.items()},
            "reported_val_loss": {f"{lr:g}": {str(s): v for s, v in r.items()} for lr, r in reported.items()},
            "status": {f"{lr:g}": v for lr, v in status.items()}}


def table(result: dict) -> str:
    stops = result["rungs"]
    lines = ["| LR | " + " | ".join(f"selection loss @ {s}" for s in stops) + " | status |",
             "|---|" + "---|" * (len(stops) + 1)]
    for lr, by_step in result["results"].items():
        cells = []
        for s in stops:
            v = by_step.get(str(s))
            cells.append("-" if v is None else ("diverged" if not math.isfinite(v) else f"{v:.4f}"))
        mark = " (best)" if float(lr) == result["best_lr"] else (" (finalist)" if lr in result["finalists"] else "")
        lines.append(f"| {lr}{mark} | " + " | ".join(cells) + f" | {result['status'][lr]} |")
    lines.append(f"\nRanked on {result['selected_on']}; rule: {result['rule']}.")
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
    ax.set(xscale="log", xlabel="peak learning rate", ylabel="selection loss", title=title)
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
    parser.add_argument("--finalists", type=int, default=2,
                        help="never keep fewer than this many rates at a pause, so they reach the end (default: 2)")
    parser.add_argument("--plateau", type=float, default=0.1,
                        help="a run within this many nats of the context-free baseline is stalled (default: 0.1)")
    parser.add_argument("--best", action="store_true", help="print only the best learning rate")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        lrs = parse_lrs(args.lrs, args.lr_range)
        args.out.mkdir(parents=True, exist_ok=True)
        log = (lambda _: None) if args.best else (lambda m: print(m, file=sys.stderr))
        result = successive_halving(cfg, lrs, args.out, args.rungs, args.eta, log, args.finalists, args.plateau)
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
