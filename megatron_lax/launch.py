"""The paper's pre-training recipes (Table 14) behind run_scripts/pretrain_*.sh.

Each run script is both a bash script (which starts the DeepSpeed launcher or torchrun) and a Python
script (which those launchers run on every rank); the Python side calls `main(scale)`, which trains
with the recipe's settings followed by the user's own arguments, so anything can be overridden.
Environment: METHOD (svd | cola | dense; default cola), GATE (identity | none | linear | dense |
tensor; default identity), ENGINE (deepspeed | fsdp | ddp | single; default deepspeed), ZERO_STAGE
(default 1), DATA (prepared shards, default data/prepared/c4), TOKENIZER (the one DATA was prepared
with, default t5-base: a hub name or a local copy), PRECISION (default bf16-pure), RUN_DIR.
"""
from __future__ import annotations

import os
import sys

SCALES = {  # preset, rank, peak LR by (method, with LaX)
    "60m": ("llama_60m", 128, {("svd", False): 2e-3, ("svd", True): 2e-2, ("cola", False): 6e-3, ("cola", True): 4e-2}),
    "130m": ("llama_130m", 256, {("svd", False): 1e-3, ("svd", True): 1e-2, ("cola", False): 4e-3, ("cola", True): 2e-2}),
    "350m": ("llama_350m", 256, {("svd", False): 1e-3, ("svd", True): 1e-2, ("cola", False): 3e-3, ("cola", True): 2e-2}),
    "1b": ("llama_1b", 512, {("svd", False): 8e-4, ("svd", True): 3e-3, ("cola", False): 2e-3, ("cola", True): 1e-2}),
}
FULL_RANK_LR = {"60m": 1e-3, "130m": 1e-3, "350m": 1e-3, "1b": 1e-3}  # GaLore's full-rank baselines
# CoLA's MLP per scale, as CoLA's configs build it: its 60M and 130M configs keep the SwiGLU's own SiLU
# (only_lr_act false); 350M and 1B leave only_lr_act at its default, true (model.only_latent_act).
COLA_ONLY_LATENT_ACT = {"60m": False, "130m": False, "350m": True, "1b": True}
# Pure bf16 (weights, gradients and AdamW states), as the GaLore and CoLA code that produced Table 5
# trains; PRECISION=bf16-mixed keeps fp32 master weights and optimizer states instead (docs/METHOD.md).
RECIPE_PRECISION = "bf16-pure"


def recipe(scale: str, method: str, gate: str, engine: str, zero_stage: str, data: str, run_dir: str,
           tokenizer: str = "t5-base", precision: str = RECIPE_PRECISION) -> list[str]:
    """Table 14: the preset's steps (10k/20k/60k/100k) and warmup (2k/4k/12k/20k), the per-variant peak
    LR, 512 x 256 tokens a step (`token_budget paper` is exactly steps x 512 x 256), AdamW with weight
    decay 0.01, clipping 0.5, cosine to 10% of the peak, one document per sequence (`data.mode paper`,
    the GaLore/CoLA protocol, so perplexities compare with Table 5), the CoLA reference init, CoLA's MLP
    as CoLA's config for the scale builds it, and the precision pinned (pure bf16 unless told)."""
    preset, rank, lrs = SCALES[scale]
    lr = FULL_RANK_LR[scale] if method == "dense" else lrs[(method, gate != "none")]
    only_latent_act = method == "cola" and COLA_ONLY_LATENT_ACT[scale]
    return ["--config", preset, "--model.method", method, "--model.rank", str(rank), "--model.lax_gate", gate,
            "--model.lowrank_init", "cola",  # the CoLA reference init, which the paper's numbers come from
            "--model.only_latent_act", str(only_latent_act).lower(), "--train.precision", precision,
            "--optim.lr", str(lr), "--optim.weight_decay", "0.01", "--optim.grad_clip", "0.5",
            "--optim.min_lr_ratio", "0.1", "--train.token_budget", "paper", "--train.global_batch", "512",
            "--data.seq_len", "256", "--data.mode", "paper", "--data.path", data, "--data.tokenizer", tokenizer,
            "--parallel.engine", engine, "--parallel.zero_stage", zero_stage, "--logging.run_dir", run_dir,
            "--checkpoint.every", "1000", "--checkpoint.resume", "auto", "--train.eval_every", "1000"]


def user_arguments(argv: list[str]) -> list[str]:
    """The user's arguments, without the --local_rank=N the DeepSpeed launcher adds."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("--local_rank="):
            continue
        elif arg == "--local_rank":
            skip = True
        else:
            out.append(arg)
    return out


def main(scale: str) -> None:
    method, gate = os.environ.get("METHOD", "cola"), os.environ.get("GATE", "identity")
    if method == "dense":
        gate = "none"
    engine = os.environ.get("ENGINE", "deepspeed")
    run_dir = os.environ.get("RUN_DIR", f"runs/{scale}_{method}_{gate}")
    args = recipe(scale, method, gate, engine, os.environ.get("ZERO_STAGE", "1"),
                  os.environ.get("DATA", "data/prepared/c4"), run_dir,
                  os.environ.get("TOKENIZER", "t5-base"), os.environ.get("PRECISION", RECIPE_PRECISION)) \
        + user_arguments(sys.argv[1:])
    from .parallel.distributed import end_process
    from .train import main as train_main
    end_process(train_main(args))
