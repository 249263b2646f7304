"""LaX's effect against a setting (depth, tokens, width): one line per method, from the results JSON
files that `python -m megatron_lax.reproduce` writes.

    python run_scripts/plot_lax_effect.py RESULTS.json... --x model.n_layers --output docs/figures/lax_vs_depth.png

For every result whose variant uses LaX and names a base in the same files, the point is the change
of the reported mean against the base's (in %, negative: LaX is better), at the value of `--x` in
the variant's resolved config (read from one of its runs). Error bars: the two spreads added
(min-max of each), so one-seed rows show none.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def setting(result: dict, key: str):
    from megatron_lax.config import load_config
    section, name = key.split(".")
    config = next(Path(result["runs"]).rglob("config.yaml"))
    return getattr(getattr(load_config(str(config)), section), name)


def points(results: list[dict], key: str) -> dict[str, list[tuple]]:
    """{method: [(x, change %, error %), ...]} for every LaX variant with its base among results."""
    by_name = {r["variant"]: r for r in results}
    lines: dict[str, list[tuple]] = {}
    for r in results:
        base = by_name.get(r.get("base"))
        if base is None or "lax" not in r["variant"]:
            continue
        change = 100 * (r["mean"] / base["mean"] - 1)
        error = 100 * ((r["max"] - r["min"]) / 2 + (base["max"] - base["min"]) / 2) / base["mean"]
        method = r["variant"].split(".")[0].replace("_lax", " + LaX").replace("svd", "SVD").replace("cola", "CoLA")
        lines.setdefault(method, []).append((setting(r, key), change, error))
    return {m: sorted(p) for m, p in lines.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--x", default="model.n_layers", help="section.key of the setting on the x axis")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    results = [r for path in args.results for r in json.loads(path.read_text())]
    lines = points(results, args.x)
    if not lines:
        print("no LaX variant with its base among the results", file=sys.stderr)
        return 2
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method, pts in lines.items():
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
        print(method, ", ".join(f"{args.x}={x}: {y:+.1f}%" for x, y, _ in pts))
    ax.axhline(0, color="grey", lw=0.8)
    metric = results[0].get("metric", "val_ppl")
    ax.set(xlabel=args.x, ylabel=f"{metric}: change vs base without LaX (%)", title="LaX's effect (negative: better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
