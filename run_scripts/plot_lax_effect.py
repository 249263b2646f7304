"""LaX's effect against a setting (depth, tokens, width), one panel per setting and one line per
method, from the results JSON files that `python -m megatron_lax.reproduce` writes.

    python run_scripts/plot_lax_effect.py --output docs/figures/lax_effect.png [--sweep-seed] \\
        --panel model.n_layers=A.json,B.json,C.json --panel train.token_budget=A.json,D.json

In each panel, every LaX variant whose base is in the same files gives one point: the change of its
metric against the base's (%, negative: LaX is better), at the variant's value of the setting (read
from its resolved config). `--sweep-seed` compares the sweep seed's runs (seed 0), for panels whose
settings were measured with different numbers of seeds. Error bars: half of each min-max range added.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lax.config import load_config  # noqa: E402
from megatron_lax.data.tokens import parse_token_count  # noqa: E402
from megatron_lax.experiments.reproduce import lax_effects  # noqa: E402


def setting(key: str):
    section, name = key.split(".")

    def value(result: dict):
        config = next(Path(result["runs"]).rglob("config.yaml"))
        value = getattr(getattr(load_config(str(config)), section), name)
        return parse_token_count(value) if key == "train.token_budget" else value
    return value


def parse_panel(text: str) -> tuple[str, list[Path]]:
    key, sep, files = text.partition("=")
    if not sep or "." not in key or not files:
        raise argparse.ArgumentTypeError(f"--panel {text!r}: expected section.key=FILE[,FILE...]")
    return key, [Path(f) for f in files.split(",")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--panel", type=parse_panel, action="append", required=True,
                        help="section.key=RESULTS.json[,...]: one panel, the setting on its x axis")
    parser.add_argument("--sweep-seed", action="store_true", help="compare the sweep seed's runs only")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    panels = []
    for key, files in args.panel:
        results = [r for path in files for r in json.loads(path.read_text())]
        lines = lax_effects(results, setting(key), args.sweep_seed)
        if not lines:
            print(f"{key}: no LaX variant with its base among {', '.join(map(str, files))}", file=sys.stderr)
            return 2
        panels.append((key, lines, results[0].get("metric", "val_ppl")))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (key, lines, metric) in zip(axes[0], panels):
        for method, pts in lines.items():
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
            print(f"{key}: {method}: " + ", ".join(f"{x}: {y:+.1f}%" for x, y, _ in pts))
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel=key, ylabel=f"{metric}: change vs base without LaX (%)")
        if key == "train.token_budget":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("LaX's effect (negative: better)" + (", sweep seed" if args.sweep_seed else ""))
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
