"""Compare finished (or running) training runs: loss curves in one PNG and a Markdown table laid out
like the paper's Table 5 (variant, validation perplexity and its change, parameters, memory).

    python -m megatron_lax.compare RUN_DIR... [--base RUN_DIR_OR_LABEL] [--output PNG] [--labels ...]

Without --base, each LaX run is compared with the run of the same method, ranks and shape without
LaX (as Table 5 puts SVD + LaX against SVD); with --base, every run is compared with that one.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from ..config import Config, ConfigError, ModelConfig, load_config
from ..method.formats import format_of
from ..models import count_parameters, family_of, memory_gb
from ..tasks import task_class


class RunError(ValueError):
    """A run directory that cannot be compared; the message names it and says why."""


@dataclass
class Run:
    path: Path
    label: str
    cfg: Config
    train: list[dict]  # {"step", "tokens", "loss", ...}, one per step, in step order
    val: list[dict]  # {"step", "tokens", "val_loss", "val_ppl", ...}, in step order
    malformed_lines: int
    latent: list[dict] = field(default_factory=list)  # {"step", "lax_rms/<proj>/<block>/<kind>": rms, ...}

    @property
    def metric(self) -> tuple[str, str, bool]:
        """(record key, name, higher is better) of the run's headline validation number: perplexity
        for a language model, top-1 accuracy for a ViT."""
        return task_class(self.cfg).headline_metric

    @property
    def unit(self) -> str:
        """What the run counts: tokens, or images for an image classifier."""
        return task_class(self.cfg).unit

    def seen(self, record: dict) -> int:
        return record.get(self.unit, record.get("tokens", 0))  # ViT runs before tasks logged images as tokens

    @property
    def final_score(self) -> Optional[float]:
        return self.val[-1].get(self.metric[0]) if self.val else None

    @property
    def tokens(self) -> int:
        last = [self.seen(records[-1]) for records in (self.train, self.val) if records]
        return max(last) if last else 0


# --- reading runs ---------------------------------------------------------------------------------

def read_records(metrics_path: Path) -> tuple[list[dict], int]:
    """The JSON objects of a metrics.jsonl and the number of lines that were not one (e.g. a line
    cut short when a run was killed mid-write, or bytes that are not UTF-8)."""
    records, malformed = [], 0
    for line in metrics_path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode())
        except (json.JSONDecodeError, UnicodeDecodeError):
            malformed += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            malformed += 1
    return records, malformed


def _number(value) -> float:
    """Metrics store non-finite floats as strings ("nan", "inf")."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _last_per_step(records: list[dict]) -> list[dict]:
    """A resumed run logs again the steps after its checkpoint: keep each step's latest record."""
    by_step = {}
    for record in records:
        by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def split_records(records: list[dict]) -> tuple[list[dict], list[dict]]:
    train, val = [], []
    for r in records:
        if "val_loss" in r or "val_ppl" in r:
            ppl = _number(r["val_ppl"]) if "val_ppl" in r else math.exp(min(_number(r["val_loss"]), 50.0))
            val.append({**r, "val_ppl": ppl, "val_loss": _number(r.get("val_loss")), "tokens": r.get("tokens", 0)})
        elif "loss" in r:
            train.append({**r, "loss": _number(r["loss"]), "tokens": r.get("tokens", 0)})
    return _last_per_step(train), _last_per_step(val)


def load_run(path: Union[str, Path], label: Optional[str] = None) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: no such run directory")
    for name in ("metrics.jsonl", "config.yaml"):
        if not (path / name).is_file():
            raise RunError(f"{path}: no {name} (not a training run directory?)")
    try:
        cfg = load_config(str(path / "config.yaml"))
    except ConfigError as e:
        raise RunError(f"{path}: unreadable config.yaml ({e})") from None
    for field in family_of(cfg.model).data_fields:  # a vocabulary, classes: filled in by the run from its data
        if getattr(cfg.model, field) <= 0:
            raise RunError(f"{path}: config.yaml has no resolved model.{field}, cannot count parameters")
    records, malformed = read_records(path / "metrics.jsonl")
    train, val = split_records(records)
    if not train and not val:
        raise RunError(f"{path}: metrics.jsonl holds no training or validation records")
    latent = [r for r in records if any(k.startswith("lax_rms/") for k in r)]
    return Run(path, label or variant_label(cfg.model), cfg, train, val, malformed, latent)


def load_runs(paths: Sequence[Union[str, Path]], labels: Optional[Sequence[str]] = None) -> list[Run]:
    if labels and len(labels) != len(paths):
        raise RunError(f"got {len(labels)} labels for {len(paths)} runs")
    runs = [load_run(p, labels[i] if labels else None) for i, p in enumerate(paths)]
    _make_labels_unique(runs)
    return runs


def _make_labels_unique(runs: list[Run]) -> None:
    """Runs that share a label all get their directory name appended."""
    shared = {run.label for run in runs if sum(other.label == run.label for other in runs) > 1}
    for run in runs:
        if run.label in shared:
            run.label = f"{run.label} [{run.path.name}]"


# --- labels and the table -------------------------------------------------------------------------

def variant_label(m: ModelConfig) -> str:
    """E.g. "Full-rank", "SVD, r=128", "CoLA + LaX (dense), r=256/384 (attn/mlp)"."""
    fmt = format_of(m)
    label = fmt.describe(m)
    if not fmt.lowrank:
        return label
    if m.uses_lax:
        if "all" not in m.lax_modules and set(m.lax_modules) != set(m.projections):
            label += f" on {','.join(m.lax_modules)}"
    attn, mlp = m.rank_of("q"), m.rank_of("gate")
    return label + (f", r={attn}" if attn == mlp else f", r={attn}/{mlp} (attn/mlp)")


def _shape_key(m: ModelConfig) -> tuple:
    return (m.method, m.rank_of("q"), m.rank_of("gate"), m.dim, m.ffn_dim, m.n_layers, m.n_heads, m.vocab_size)


def _paired_base(run: Run, runs: Sequence[Run]) -> Optional[Run]:
    """The non-LaX run of the same method, ranks and shape, for a LaX run."""
    if not run.cfg.model.uses_lax:
        return None
    return next((other for other in runs if not other.cfg.model.uses_lax
                 and _shape_key(other.cfg.model) == _shape_key(run.cfg.model)), None)


def find_run(runs: Sequence[Run], label_or_path: str) -> Run:
    for run in runs:
        if run.label == label_or_path:
            return run
    wanted = Path(label_or_path).resolve()
    for run in runs:
        if run.path.resolve() == wanted:
            return run
    raise RunError(f"base {label_or_path!r} matches no run (labels: {', '.join(r.label for r in runs)})")


def format_tokens(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def _score_cell(run: Run, base: Optional[Run]) -> str:
    score = run.final_score
    if score is None:
        return "-"
    if base is None or base is run or base.final_score is None:
        return f"{score:.2f}"
    return f"{score:.2f} ({score - base.final_score:+.2f})"


def comparison_table(runs: Sequence[Run], base: Union[Run, str, None] = None) -> str:
    """Markdown rows: variant, tokens seen, final validation perplexity (with its change against
    `base`, or against the paired non-LaX run when base is None), params (M), memory (GB)."""
    if isinstance(base, str):
        base = find_run(runs, base)
    seen = runs[0].unit if runs else "tokens"
    score = runs[0].metric[1] if runs else "val PPL"
    lines = [f"| variant | {seen} | {score} | params (M) | mem (GB) |", "|---|---|---|---|---|"]
    for run in runs:
        reference = base if base is not None else _paired_base(run, runs)
        params = count_parameters(run.cfg.model)
        lines.append(f"| {run.label} | {format_tokens(run.tokens)} | {_score_cell(run, reference)} | "
                     f"{params / 1e6:.1f} | {memory_gb(params):.2f} |")
    return "\n".join(lines)


LATENT_KINDS = ("own", "crossing", "latent", "out")


def latent_rms_table(runs: Sequence[Run]) -> str:
    """Per logged step, the mean over projections and blocks of each latent RMS the trainer records
    (see introspection.latent_rms): A x (`own`), the crossing G(z), what B multiplies (`latent`) and
    B's output (`out`)."""
    lines = ["| run | step | " + " | ".join(LATENT_KINDS) + " |", "|---|---|" + "---|" * len(LATENT_KINDS)]
    for run in runs:
        for record in run.latent:
            cells = []
            for kind in LATENT_KINDS:
                values = [v for k, v in record.items() if k.startswith("lax_rms/") and k.endswith(f"/{kind}")]
                cells.append(f"{sum(values) / len(values):.3f}" if values else "-")
            lines.append(f"| {run.label} | {record['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- the plot -------------------------------------------------------------------------------------

def plot_curves(runs: Sequence[Run], output: Union[str, Path]) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        train_ax.plot([run.seen(r) for r in run.train], [r["loss"] for r in run.train], lw=1, label=run.label)
        val_ax.plot([run.seen(r) for r in run.val], [r[run.metric[0]] for r in run.val], marker="o", ms=3,
                    label=run.label)
    seen = f"{runs[0].unit if runs else 'tokens'} seen"
    train_ax.set(title="Training loss", xlabel=seen, ylabel="loss")
    if runs and runs[0].metric[2]:  # higher is better: an accuracy
        val_ax.set(title="Validation accuracy", xlabel=seen, ylabel=runs[0].metric[1])
    else:
        val_ax.set(title="Validation perplexity", xlabel=seen, ylabel="perplexity", yscale="log")
        val_ax.yaxis.set_major_formatter(ScalarFormatter())  # plain numbers, not 6x10^1, on the log axis
        val_ax.yaxis.set_minor_formatter(ScalarFormatter())
    for ax in (train_ax, val_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def best_run(runs: Sequence[Run]) -> Run:
    """The lowest final perplexity, or the highest final accuracy for ViTs."""
    finished = [run for run in runs if run.final_score is not None and math.isfinite(run.final_score)]
    if not finished:
        raise RunError("no run has a finite validation score")
    sign = -1 if finished[0].metric[2] else 1
    return min(finished, key=lambda run: sign * run.final_score)


# --- command line ---------------------------------------------------------------------------------

def _with_base_run(runs: list[Run], base: str) -> list[Run]:
    """A --base directory that is not among the runs joins them, first."""
    try:
        find_run(runs, base)
        return runs
    except RunError:
        if not Path(base).is_dir():
            raise
    runs = [load_run(base), *runs]
    _make_labels_unique(runs)
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_lax.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (metrics.jsonl + config.yaml)")
    parser.add_argument("--base", help="run directory or label to compare every run against")
    parser.add_argument("--output", default="comparison.png", help="PNG path (default: %(default)s)")
    parser.add_argument("--labels", nargs="+", help="one legend/table label per run (default: from the config)")
    parser.add_argument("--best", action="store_true",
                        help="only print the directory of the run with the lowest final validation perplexity")
    parser.add_argument("--latent-rms", action="store_true",
                        help="only print the latent RMS records (mean over projections and blocks) of each run")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.runs, args.labels)
        if args.best:
            print(best_run(runs).path)
            return 0
        if args.latent_rms:
            print(latent_rms_table(runs))
            return 0
        if args.base:
            runs = _with_base_run(runs, args.base)
        table = comparison_table(runs, args.base)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for run in runs:
        if run.malformed_lines:
            print(f"warning: {run.path / 'metrics.jsonl'}: skipped {run.malformed_lines} malformed line(s)",
                  file=sys.stderr)
    print(table)
    against = f"against {args.base}" if args.base else "of each LaX run against its same-rank run without LaX"
    print(f"\n{runs[0].metric[1]} change (in brackets): {against}")
    print(f"wrote {plot_curves(runs, args.output)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
