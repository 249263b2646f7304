"""The paper's pre-training recipes (Table 14) behind run_scripts/pretrain_*.sh.

Each run script is both a bash script (which starts the DeepSpeed launcher or torchrun) and a Python
script (which those launchers run on every rank); the Python side calls `main(scale)`, which trains
with the recipe's settings followed by the user's own arguments, so anything can be overridden.
The ViT scripts (pretrain_vit_b.sh, pretrain_vit_l.sh) follow Tables 9-10 the same way.
Environment: METHOD (svd | cola | dense, and tt for the ViTs; default cola), GATE (identity | none |
linear | dense | tensor; default identity, tensor for the ViTs), ENGINE (deepspeed | fsdp | ddp | single;
default deepspeed), ZERO_STAGE (default 1), DATA (prepared shards, default data/prepared/c4; or a stream,
tokenised while training with no preparation pass: hf:allenai/c4 (config en; hf:OWNER/NAME/CONFIG for
another) from the hub, stream:DIR or stream:GLOB for local C4-layout shards; for the ViTs an ImageNet
root with train/ and val/ class folders, default data/imagenet), TOKENIZER (the one DATA was prepared
with, or the stream is tokenised with; default t5-base: a hub name or a local copy), PRECISION (default bf16-pure for the LLaMA
recipes, bf16-mixed for the ViTs), RUN_DIR.
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


# Loader workers per GPU that tokenise a streamed DATA: about twice what a 1B low-rank model eats on an
# H100 at MFU 50%, at one worker's measured rate with t5-base's kind of tokenizer (docs/BENCHMARKS.md 1.4).
STREAM_WORKERS = 4


def data_arguments(data: str) -> list[str]:
    """The data fields of DATA: prepared shards (a directory), or a stream (hf:..., stream:...)."""
    if data.startswith(("hf:", "stream:")):
        return ["--data.source", "stream", "--data.raw", data.removeprefix("stream:"), "--data.loader_workers",
                str(STREAM_WORKERS)]
    return ["--data.path", data]


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
            "--data.seq_len", "256", "--data.mode", "paper", *data_arguments(data), "--data.tokenizer", tokenizer,
            "--parallel.engine", engine, "--parallel.zero_stage", zero_stage, "--logging.run_dir", run_dir,
            "--checkpoint.every", "1000", "--checkpoint.resume", "auto", "--train.eval_every", "1000"]


# Tables 9-10 (ViT-B / ViT-L on ImageNet-1k): preset, rank of SVD and CoLA, TT ranks (attention, MLP).
# The TT MLP ranks are not in the tables: the official code sizes them to keep the parameter count
# its rank rule gives, which is what reproduces Table 1's counts (ViT-L exactly; docs/VISION.md).
VIT_SCALES = {"vit_b": ("vit_b", 256, (336, 158)), "vit_l": ("vit_l", 256, (256, 198))}
VIT_LR = {"dense": 3e-3, "svd": 1e-3, "cola": 1e-3, "tt": 1e-3}  # Tables 9-10, with or without LaX
VIT_EPOCH_STEPS = 1_281_167 // 4096  # ImageNet-1k training images per step of 4096: checkpoint once an epoch


def vit_variant(scale: str, method: str, gate: str) -> dict:
    """The model overrides of a Table 1 variant: the method, gate and ranks, and for TT + LaX
    intra-layer LaX on the attention projections (the official config)."""
    preset, rank, (tt_attn, tt_mlp) = VIT_SCALES.get(scale, (scale, 0, (0, 0)))
    overrides = {"model.method": method, "model.lax_gate": gate if method != "dense" else "none"}
    if method in ("svd", "cola") and rank:
        overrides["model.rank"] = str(rank)
    if method == "tt" and tt_attn:
        overrides.update({"model.attn_rank": str(tt_attn), "model.mlp_rank": str(tt_mlp)})
    if method == "tt" and gate != "none":
        overrides["model.lax_intra_modules"] = "q,k,v,o"
    return overrides


VIT_PRECISION = "bf16-mixed"  # autocast over fp32 master weights, as timm/DeiT train ViTs


def vit_recipe(scale: str, method: str, gate: str, engine: str, zero_stage: str, data: str, run_dir: str,
               precision: str = VIT_PRECISION) -> list[str]:
    """Tables 9-10: 300 epochs, cosine, 10 warmup epochs, base LR 3e-3 full rank and 1e-3 low rank,
    weight decay 0.3, dropout 0.1; LaX with the tensor gate between blocks on q, k, v, o, fc1, fc2
    (Tables 11-12, and the official configs, which also cross o), plus intra-layer LaX on the
    attention projections for TT (the official config). Where the paper is silent: the ViT paper's
    batch of 4096 with AdamW (0.9, 0.999) and clipping at 1.0 (Table 9's base LR is used as is at that
    batch), DeiT's augmentation (the `augment` defaults), bf16 autocast over fp32 master weights, and
    low-rank factors whose product starts with the dense ViT's weight std (`matched`)."""
    args = ["--config", VIT_SCALES[scale][0], "--model.dropout", "0.1",
            "--model.lowrank_init", "matched",  # low-rank products start with the ViT's dense init std (0.02)
            "--optim.lr", str(VIT_LR[method]), "--optim.weight_decay", "0.3", "--optim.warmup_epochs", "10",
            "--optim.min_lr_ratio", "0.0", "--optim.beta1", "0.9", "--optim.beta2", "0.999", "--optim.grad_clip",
            "1.0", "--train.epochs", "300", "--train.global_batch", "4096", "--train.micro_batch", "128",
            "--train.precision", precision, "--data.path", data, "--data.loader_workers", "8",
            "--parallel.engine", engine, "--parallel.zero_stage", zero_stage, "--logging.run_dir", run_dir,
            "--checkpoint.every", str(VIT_EPOCH_STEPS), "--checkpoint.resume", "auto",
            "--train.eval_every", str(VIT_EPOCH_STEPS)]
    return args + [arg for key, value in vit_variant(scale, method, gate).items() for arg in (f"--{key}", value)]


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
    vit = scale in VIT_SCALES
    method, gate = os.environ.get("METHOD", "cola"), os.environ.get("GATE", "tensor" if vit else "identity")
    if method == "dense":
        gate = "none"
    engine = os.environ.get("ENGINE", "deepspeed")
    run_dir = os.environ.get("RUN_DIR", f"runs/{scale}_{method}_{gate}")
    zero_stage = os.environ.get("ZERO_STAGE", "1")
    if vit:
        args = vit_recipe(scale, method, gate, engine, zero_stage, os.environ.get("DATA", "data/imagenet"), run_dir,
                          os.environ.get("PRECISION", VIT_PRECISION))
    else:
        args = recipe(scale, method, gate, engine, zero_stage, os.environ.get("DATA", "data/prepared/c4"), run_dir,
                      os.environ.get("TOKENIZER", "t5-base"), os.environ.get("PRECISION", RECIPE_PRECISION))
    args += user_arguments(sys.argv[1:])
    from .parallel.distributed import end_process
    from .train import main as train_main
    end_process(train_main(args))
