"""Training-step cost of LaX: tokens/s of SVD + LaX (each gate) against SVD, and of CoLA + LaX
against CoLA, at the same shapes and batch, next to the analytic FLOPs overhead.

    python benchmarks/bench_lax_overhead.py [--shape llama_60m] [--rounds 8] [--steps 2]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import SHAPES, markdown_table, model_config, print_header, time_models  # noqa: E402
from megatron_lax.models.llama import count_parameters, flops_per_token  # noqa: E402

# (name, method, gate, base name)
VARIANTS = [
    ("SVD", "svd", "none", None),
    ("SVD + LaX (identity)", "svd", "identity", "SVD"),
    ("SVD + LaX (linear)", "svd", "linear", "SVD"),
    ("SVD + LaX (dense)", "svd", "dense", "SVD"),
    ("SVD + LaX (tensor)", "svd", "tensor", "SVD"),
    ("CoLA", "cola", "none", None),
    ("CoLA + LaX (identity)", "cola", "identity", "CoLA"),
    ("CoLA + LaX (dense)", "cola", "dense", "CoLA"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama_60m", choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS], metavar="NAME",
                        help="a subset of: %(default)s (each LaX variant needs its base too)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per contender per round")
    args = parser.parse_args()
    seq_len = SHAPES[args.shape]["seq_len"]
    variants = [v for v in VARIANTS if v[0] in args.variants]
    missing = {base for _, _, _, base in variants if base} - set(args.variants)
    if missing:
        parser.error(f"--variants lacks the base run(s) {sorted(missing)}")
    configs = {name: model_config(args.shape, method=method, lax_gate=gate) for name, method, gate, _ in variants}
    timing = time_models(configs, args.shape, args.rounds, args.steps)
    rows = []
    for name, _, _, base in variants:
        cfg, flops = configs[name], flops_per_token(configs[name], seq_len)["train"]
        if base is None:
            vs_base, cost, flops_cost = "1 (base)", "-", "-"
        else:
            ratio = timing.ratio(name, base)
            vs_base, cost = timing.ratio_cell(name, base), f"{100 * (1 / ratio - 1):+.1f}%"
            flops_cost = f"{100 * (flops / flops_per_token(configs[base], seq_len)['train'] - 1):+.2f}%"
        rows.append([name, f"{count_parameters(cfg) / 1e6:.2f}", f"{timing.median(name):.0f}", vs_base, cost,
                     flops_cost, f"±{100 * timing.spread(name):.0f}%"])
    spec = SHAPES[args.shape]
    print_header(f"LaX overhead on the training step ({args.shape} shapes, batch {spec['batch']} x {seq_len}, fp32)")
    print(markdown_table(["variant", "params (M)", "tok/s (median)", "tok/s vs base (paired median [quartiles])",
                          "step time overhead", "FLOPs overhead", "round spread"], rows))


if __name__ == "__main__":
    main()
