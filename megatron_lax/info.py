"""A model's row as in the paper's Table 5 (LLaMA) or Table 1 (ViT):

    python -m megatron_lax.info --config FILE_OR_PRESET [--section.key value ...] [--json]

Parameters (M), the memory estimate (GB: BF16 weights, gradients and two Adam states; activations
excluded) and FLOPs per token, or per image for a ViT (training = 3 x forward).
"""
from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, add_config_arguments, config_from_args
from .models import family_of, memory_gb
from .method.formats import format_of
from .method.lowrank import lowrank_factor_std

PAPER_VOCAB = 32000  # Table 5 counts: the T5 tokenizer's 32,000 pieces, without its 100 sentinel ids


def describe_vit(cfg) -> dict:
    """The Table 1 row; a config whose classes and channels follow the data is counted at ImageNet's
    1,000 classes of RGB images."""
    m = cfg.model
    m.num_classes, m.in_channels = m.num_classes or 1000, m.in_channels or 3
    family = family_of(m)
    params, flops = family.count_parameters(m), family.flops(m)
    variant = format_of(m).describe(m)
    ranks = sorted({m.rank_of(p) for p in m.projections}) if format_of(m).lowrank else []
    return {"variant": variant, "rank": ranks, "params": params, "params_m": params / 1e6,
            "memory_gb": memory_gb(params), "flops_per_image": flops["train"], "forward_flops_per_image": flops["forward"],
            "image_size": m.image_size, "patch_size": m.patch_size, "num_classes": m.num_classes,
            "lowrank_init": m.resolved_lowrank_init, "dim": m.dim, "n_layers": m.n_layers}


def describe(cfg) -> dict:
    """The Table 5 row. A config whose vocabulary follows its tokenizer (model.vocab_size 0) is counted
    at the paper's 32,000; a run with t5-base has 32,128 embedding rows (32,100 entries rounded up
    to a multiple of 64), 0.4M parameters more at 60M."""
    m = cfg.model
    vocab_source = "model.vocab_size"
    if m.vocab_size <= 0:
        m.vocab_size, vocab_source = PAPER_VOCAB, "the paper's 32,000 (model.vocab_size follows the tokenizer)"
    family = family_of(m)
    params, flops = family.count_parameters(m), family.flops(m, cfg.data.seq_len)
    variant = format_of(m).describe(m)
    ranks = sorted({m.rank_of(p) for p in m.projections}) if format_of(m).lowrank else []
    return {"variant": variant, "rank": ranks, "params": params, "init": init_scales(m), "params_m": params / 1e6,
            "memory_gb": memory_gb(params), "flops_per_token": flops["train"],
            "forward_flops_per_token": flops["forward"], "seq_len": cfg.data.seq_len, "vocab_size": m.vocab_size,
            "vocab_source": vocab_source, "lowrank_init": m.resolved_lowrank_init,
            "dim": m.dim, "n_layers": m.n_layers}


def init_scales(m) -> dict:
    """Factor and product (B A) stds of q (dim x dim) and up (dim x ffn) under both low-rank inits."""
    if not format_of(m).lowrank:
        return {}
    scales = {}
    for init in ("cola", "matched"):
        for name, (d_in, d_out) in (("q", (m.dim, m.dim)), ("up", (m.dim, m.ffn_dim))):
            r = m.rank_of(name)
            factor = lowrank_factor_std(d_in, d_out, r, init, m.init_std)
            scales[f"{init}/{name}"] = {"factor_std": factor, "product_std": factor**2 * r**0.5}
    return scales


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_lax.info", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        images = not family_of(cfg.model).uses_tokenizer
        row = describe_vit(cfg) if images else describe(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(row))
        return 0
    if images:
        print("| variant | rank | params (M) | memory (GB) | GFLOPs/image (train) |")
        print("|---|---|---|---|---|")
        print(f"| {row['variant']} | {'/'.join(map(str, row['rank'])) or '-'} | {row['params_m']:.2f} | "
              f"{row['memory_gb']:.2f} | {row['flops_per_image'] / 1e9:.1f} |")
        return 0
    rank = "/".join(map(str, row["rank"])) or "-"
    config_init = row["lowrank_init"]
    print("| variant | rank | params (M) | memory (GB) | FLOPs/token (train) |")
    print("|---|---|---|---|---|")
    print(f"| {row['variant']} | {rank} | {row['params_m']:.1f} | {row['memory_gb']:.2f} | "
          f"{row['flops_per_token'] / 1e6:.1f}M |")
    print(f"\nvocabulary {row['vocab_size']:,}: {row['vocab_source']}")
    for init in ("cola", "matched"):
        if row["init"]:
            q, up = row["init"][f"{init}/q"], row["init"][f"{init}/up"]
            chosen = " (this config)" if init == config_init else ""
            print(f"model.lowrank_init {init}{chosen}: factor std q {q['factor_std']:.4f}, up {up['factor_std']:.4f}; "
                  f"B A std q {q['product_std']:.4f}, up {up['product_std']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
