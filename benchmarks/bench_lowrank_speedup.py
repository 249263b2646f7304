"""Training tokens/s of the low-rank models (SVD, CoLA) over the dense one at the same shapes and
batch, next to the ratio of training FLOPs per token that flops_per_token predicts.

    python benchmarks/bench_lowrank_speedup.py [--shape llama_60m] [--rounds 8] [--steps 2] [--fused-adamw]

Per-step costs that do not scale with tokens (AdamW over every parameter, the embedding gradient)
keep the measured speed-up under the FLOPs ratio at small batches; --fused-adamw shrinks the first.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import SHAPES, markdown_table, model_config, print_header, time_models  # noqa: E402
from megatron_lax.models.llama import count_parameters, flops_per_token  # noqa: E402

VARIANTS = {"Full-rank": "dense", "SVD": "svd", "CoLA": "cola"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama_60m", choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="training steps per contender per round")
    parser.add_argument("--fused-adamw", action="store_true", help="torch's fused AdamW instead of the default")
    args = parser.parse_args()
    spec = SHAPES[args.shape]
    configs = {name: model_config(args.shape, method=method) for name, method in VARIANTS.items()}
    timing = time_models(configs, args.shape, args.rounds, args.steps, args.fused_adamw)
    dense_flops = flops_per_token(configs["Full-rank"], spec["seq_len"])["train"]
    rows = []
    for name, cfg in configs.items():
        flops = flops_per_token(cfg, spec["seq_len"])["train"]
        rank = cfg.rank if cfg.method != "dense" else "-"
        rows.append([name, rank, f"{count_parameters(cfg) / 1e6:.2f}", f"{flops / 1e6:.1f}",
                     f"{timing.median(name):.0f}", timing.ratio_cell(name, "Full-rank"),
                     f"{dense_flops / flops:.3f}", f"±{100 * timing.spread(name):.0f}%"])
    adamw = "fused AdamW" if args.fused_adamw else "default AdamW"
    print_header(f"Low-rank speed-up over dense on the training step ({args.shape} shapes, batch "
                 f"{spec['batch']} x {spec['seq_len']}, fp32, {adamw})")
    header = ["variant", "rank", "params (M)", "train MFLOPs/token", "tok/s (median)",
              "speed-up vs dense (paired median [quartiles])", "FLOPs ratio dense / variant", "round spread"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
