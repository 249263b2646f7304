"""The paper's pre-training recipes (Table 14) behind run_scripts/pretrain_*.sh.

Each run script is both a bash script (which starts the DeepSpeed launcher or torchrun) and a Python
script (which those launchers run on every rank); the Python side calls `main(scale)`, which trains
with the recipe's settings followed by the user's own arguments, so anything can be overridden.
The ViT scripts (pretrain_vit_b.sh, pretrain_vit_l.sh) follow Tables 9-10 the same way, with the
settings the paper leaves out from one of two named recipes (VIT_RECIPES, environment RECIPE):
`official` (the default: the authors' published command, which produced the paper's numbers) or `deit`
(the ViT paper's and DeiT's settings).
Environment: METHOD (svd | cola | dense, and tt for the ViTs; default cola), GATE (identity | none |
linear | dense | tensor; default identity, tensor for the ViTs), ENGINE (deepspeed | fsdp | ddp | single;
default deepspeed), ZERO_STAGE (default 1), DATA (prepared shards, default data/prepared/c4; or a stream,
tokenised while training with no preparation pass: hf:allenai/c4 (config en; hf:OWNER/NAME/CONFIG for
another) from the hub, stream:DIR or stream:GLOB for local C4-layout shards; for the ViTs an ImageNet
root with train/ and val/ class folders, default data/imagenet), TOKENIZER (the one DATA was prepared
with, or the stream is tokenised with; default hf:t5-base: a hub name or a local copy), PRECISION
(default bf16-pure for the LLaMA recipes, the recipe's for the ViTs: fp32 official, bf16-mixed deit),
RECIPE (ViTs: official | deit), RUN_DIR. Before training, the LLaMA recipes run the memory plan
(megatron_lax.plan) for this GPU (PLAN_GPU: a name such as a100-40 or GiB, for a node without one) and
the launch's number of ranks, and refuse a job that cannot fit in one line naming the micro-batch and
checkpointing mode that would; MEMORY_PLAN=ignore runs it anyway, MEMORY_PLAN=only prints the whole
plan (memory table, largest micro-batches, time; WORLD_SIZE ranks) and exits.
"""
from __future__ import annotations

import dataclasses
import os
import sys

from . import paper
from .method.formats import FORMATS
from .plan import config_of, preflight, report, this_gpu

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
           tokenizer: str = "hf:t5-base", precision: str = RECIPE_PRECISION) -> list[str]:
    """Table 14: the preset's steps (10k/20k/60k/100k) and warmup (2k/4k/12k/20k), the per-variant peak
    LR, 512 x 256 tokens a step (`token_budget paper` is exactly steps x 512 x 256), AdamW with weight
    decay 0.01, clipping 0.5, cosine to 10% of the peak, one document per sequence (`data.mode paper`,
    the GaLore/CoLA protocol, so perplexities compare with Table 5), the CoLA reference init, CoLA's MLP
    as CoLA's config for the scale builds it, and the precision pinned (pure bf16 unless told)."""
    table = paper.TABLE_14[scale]
    if (method, gate != "none") not in table.lr:
        raise ValueError(f"Table 14 has no learning rate for METHOD={method} GATE={gate}")
    lr = table.lr[(method, gate != "none")]
    only_latent_act = table.cola_only_latent_act and owns_field(method, "only_latent_act")
    return ["--config", table.preset, "--model.method", method, "--model.rank", str(table.rank),
            "--model.lax_gate", gate,
            "--model.lowrank_init", "cola",  # the CoLA reference init, which the paper's numbers come from
            "--model.only_latent_act", str(only_latent_act).lower(), "--train.precision", precision,
            "--optim.lr", str(lr), "--optim.weight_decay", "0.01", "--optim.grad_clip", "0.5",
            "--optim.min_lr_ratio", "0.1", "--train.token_budget", "paper", "--train.global_batch", "512",
            "--data.seq_len", "256", "--data.mode", "paper", *data_arguments(data), "--data.tokenizer", tokenizer,
            "--parallel.engine", engine, "--parallel.zero_stage", zero_stage, "--logging.run_dir", run_dir,
            "--checkpoint.every", "1000", "--checkpoint.resume", "auto", "--train.eval_every", "1000"]


# Two recipes; both train 300 epochs with AdamW (0.9, 0.999), Table 9's LR (not rescaled with the
# batch), weight decay 0.3 (timm's rule: not on norms, biases, position embeddings and CLS token), 10
# warmup epochs and a cosine to 0. What differs (docs/VISION.md, "The recipes"):
VIT_RECIPES = {
    # The authors' published command (the LaX repository's README, timm's train.py on 8 GPUs), which
    # produced the paper's numbers: 128 images x 8 GPUs, fp32 (TF32 matmuls, as timm's train.py runs it),
    # no clipping, AutoAugment's ImageNet policy, mixup 0.2 (no cutmix, no erasing), label smoothing 0.1,
    # dropout 0.1 in the low-rank MLPs only (their model configs; the dense ViT, timm's, has none) and none
    # before the head, and the official code's Kaiming initialisation of factors, cores and tensor gates.
    "official": {"train.global_batch": "1024", "train.micro_batch": "128", "train.precision": "fp32",
                 "train.tf32": "true", "optim.grad_clip": "0", "model.head_dropout": "0",
                 "model.lowrank_init": "kaiming", "augment.auto_augment": "original", "augment.randaugment_n": "0",
                 "augment.mixup": "0.2", "augment.cutmix": "0", "augment.random_erasing": "0"},
    # The ViT paper's ImageNet settings (batch 4,096, clipping 1.0; Table 9's LR, weight decay and dropout
    # are theirs) with DeiT's augmentation (the `augment` defaults: RandAugment 2 x 9, mixup 0.8, cutmix
    # 1.0, erasing 0.25), dropout 0.1 before the head too, bf16 autocast, identity gates and each method's
    # measured factor init (`lowrank_init auto`).
    "deit": {"train.global_batch": "4096", "train.micro_batch": "128", "train.precision": "bf16-mixed",
             "optim.grad_clip": "1.0", "model.lowrank_init": "auto"},
}
# The official code's gate initialisation by gate: Kaiming-uniform tensor-gate cores; its dense gate is an
# nn.Linear that timm's ViT initialisation redraws as N(0, 0.02^2) with a zero bias (`small` here).
OFFICIAL_GATE_INIT = {"tensor": "kaiming", "dense": "small"}


def owns_field(method: str, key: str) -> bool:
    """Whether the format `method` declares the model field `key` (e.g. CoLA's only_latent_act)."""
    fields = FORMATS[method].fields
    return fields is not None and key in {f.name for f in dataclasses.fields(fields)}


def vit_variant(scale: str, method: str, gate: str) -> dict:
    """The model overrides of a Table 1 variant: the method, gate and the format's own settings of the
    paper's scale (Format.vit_overrides: ranks; for TT its ranks and modes, and with LaX intra-layer
    LaX on the attention projections, the official config)."""
    fmt = FORMATS[method]
    overrides = {"model.method": method, "model.lax_gate": gate if fmt.lowrank else "none"}
    if scale in paper.TABLES_9_10:
        overrides.update(fmt.vit_overrides(paper.TABLES_9_10[scale], gate))
    return overrides


def vit_recipe(scale: str, method: str, gate: str, engine: str, zero_stage: str, data: str, run_dir: str,
               precision: str | None = None, recipe: str = "official") -> list[str]:
    """Tables 9-10 with one of VIT_RECIPES for what the paper leaves out: 300 epochs, cosine to 0, 10
    warmup epochs, base LR 3e-3 full rank and 1e-3 low rank (with or without LaX), weight decay 0.3,
    dropout 0.1; LaX with the tensor gate between blocks on q, k, v, o, fc1, fc2 (Tables 11-12, and
    the official configs, which also cross o), plus intra-layer LaX on the attention projections for TT
    (the official config). `precision` (None: the recipe's) overrides the recipe's."""
    if recipe not in VIT_RECIPES:
        raise ValueError(f"unknown ViT recipe {recipe!r} (choose from {', '.join(VIT_RECIPES)})")
    lowrank = FORMATS[method].lowrank
    settings = {"model.dropout": str(paper.VIT_DROPOUT), "optim.lr": str(paper.VIT_LR[lowrank]),
                "optim.weight_decay": str(paper.VIT_WEIGHT_DECAY), "optim.warmup_epochs": str(paper.VIT_WARMUP_EPOCHS),
                "optim.min_lr_ratio": "0.0", "optim.beta1": "0.9", "optim.beta2": "0.999",
                "train.epochs": str(paper.VIT_EPOCHS), **VIT_RECIPES[recipe]}
    if recipe == "official":
        if not lowrank:  # timm's ViT as the official command builds it: no dropout; timm's eval crop
            settings.update({"model.dropout": "0.0", "augment.crop_pct": "0.9"})
        if gate in OFFICIAL_GATE_INIT and lowrank:
            settings["model.lax_gate_init"] = OFFICIAL_GATE_INIT[gate]
    if precision:
        settings["train.precision"] = precision
    epoch_steps = paper.IMAGENET_TRAIN_IMAGES // int(settings["train.global_batch"])  # checkpoint, validate each epoch
    settings.update({"data.path": data, "data.loader_workers": "10",  # per GPU: docs/BENCHMARKS.md section 7
                     "parallel.engine": engine, "parallel.zero_stage": zero_stage, "logging.run_dir": run_dir,
                     "checkpoint.every": str(epoch_steps), "checkpoint.resume": "auto",
                     "train.eval_every": str(epoch_steps), **vit_variant(scale, method, gate)})
    return ["--config", paper.TABLES_9_10[scale].preset] + [arg for key, value in settings.items() for arg in (f"--{key}", value)]


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


# The environment a recipe is read from. The DeepSpeed launcher starts remote ranks through pdsh with
# only a few prefixes of its own environment (NCCL_, PYTHON...) and .deepspeed_env: launch.sh hands
# these over as `--launch-env NAME=VALUE` arguments instead, which every rank receives.
# MEMORY_PLAN and PLAN_GPU steer the memory check every rank runs before training, so they travel too.
RECIPE_ENVIRONMENT = ("METHOD", "GATE", "ENGINE", "ZERO_STAGE", "DATA", "TOKENIZER", "PRECISION", "RUN_DIR", "RECIPE",
                      "MEMORY_PLAN", "PLAN_GPU")
# Set by the launcher on each rank itself, never forwarded.
RANK_ENVIRONMENT = ("RANK", "WORLD_SIZE")


def forwarded_environment(argv: list[str], environ) -> tuple[list[str], dict]:
    """(argv without the `--launch-env NAME=VALUE` pairs, `environ` updated with them)."""
    rest, environ = [], dict(environ)
    arguments = iter(argv)
    for arg in arguments:
        if arg != "--launch-env":
            rest.append(arg)
            continue
        name, _, value = next(arguments, "=").partition("=")
        if name not in RECIPE_ENVIRONMENT:
            raise SystemExit(f"error: --launch-env {name!r} is not a recipe setting ({', '.join(RECIPE_ENVIRONMENT)})")
        environ[name] = value
    return rest, environ


def recipe_arguments(scale: str, argv: list[str], environ) -> list[str]:
    """The training arguments of a rank: the recipe from the (forwarded) environment, then the user's."""
    argv, environ = forwarded_environment(argv, environ)
    vit = scale in paper.TABLES_9_10
    method, gate = environ.get("METHOD", "cola"), environ.get("GATE", "tensor" if vit else "identity")
    if method in FORMATS and not FORMATS[method].lowrank:
        gate = "none"
    engine = environ.get("ENGINE", "deepspeed")
    run_dir = environ.get("RUN_DIR", f"runs/{scale}_{method}_{gate}")
    zero_stage = environ.get("ZERO_STAGE", "1")
    if vit:
        args = vit_recipe(scale, method, gate, engine, zero_stage, environ.get("DATA", "data/imagenet"), run_dir,
                          environ.get("PRECISION"), environ.get("RECIPE", "official"))
    else:
        args = recipe(scale, method, gate, engine, zero_stage, environ.get("DATA", "data/prepared/c4"), run_dir,
                      environ.get("TOKENIZER", "hf:t5-base"), environ.get("PRECISION", RECIPE_PRECISION))
    return args + user_arguments(argv)


def main(scale: str) -> None:
    args = recipe_arguments(scale, sys.argv[1:], os.environ)
    from .parallel.distributed import end_process
    _, environ = forwarded_environment(sys.argv[1:], os.environ)
    world, gpu = int(environ.get("WORLD_SIZE", "1")), environ.get("PLAN_GPU")
    if environ.get("MEMORY_PLAN") == "only":
        print(report(config_of(args), world, gpu or this_gpu() or "a100-80", None, None))
        end_process(0)
    refusal = None if environ.get("MEMORY_PLAN") == "ignore" else preflight(args, world, gpu)
    if refusal:
        if int(environ.get("RANK", "0")) == 0:
            print(f"error: {refusal} (MEMORY_PLAN=ignore runs it anyway)", file=sys.stderr)
        end_process(2)
    from .train import main as train_main
    end_process(train_main(args, exiting=True))
