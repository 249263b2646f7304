"""Will this run fit, and how long will it take? Per-rank GPU memory and time of a LLaMA pre-training
config, computed from shapes (no GPU, no data, nothing allocated: the model is built on the meta
device only to list its parameter shapes).

    python -m megatron_lax.plan --config llama_1b --model.method cola --model.lax_gate identity \\
        --parallel.engine fsdp --train.precision bf16-pure --gpus 8 --gpu a100-40

Memory per rank: parameters, gradients, optimizer states and master weights as the engine holds them
(DDP: whole; FSDP2: each parameter's dim-0 chunk of the largest rank; ZeRO: DeepSpeed's partitions),
the activations one micro-batch keeps for backward (the family's activation_rows, each format's
saved_bytes in its own file) plus the one block a checkpointed backward rematerialises, the loss's fp32
log-probabilities and the attention kernel's workspace, communication buffers, and a stated
allowance for the CUDA context (CUDA_CONTEXT_GIB) and the allocator (FRAGMENTATION). Time: the
recipe's token budget at a stated MFU (--mfu, or the one a bench_gpu.py JSON measured).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .config import CHECKPOINTING_MODES, Config, ConfigError, add_config_arguments, config_from_args
from .models import family_of
from .parallel.optim import param_groups
from .training.introspection import PEAK_BF16_FLOPS

GIB = 2 ** 30
# Usable memory (nvidia-smi's total) of the named GPUs, GiB, and the name PEAK_BF16_FLOPS knows them by.
GPUS = {"a100-40": (39.4, "A100"), "a100-80": (79.1, "A100"), "h100": (79.6, "H100"), "h200": (140.4, "H200")}
CUDA_CONTEXT_GIB = 1.5  # CUDA context, cuBLAS/NCCL workspaces: what a process holds before its first tensor
FRAGMENTATION = 0.10  # the caching allocator's reserved-but-unused share on top of the tensors
DEFAULT_MFU = 0.35
PAPER_VOCAB = 32000  # the vocabulary counted when model.vocab_size is not resolved (no tokenizer)


@dataclass
class Plan:
    rows: dict[str, float]  # bytes per rank, by what holds them
    per_sample: float  # bytes that grow with each sequence of the micro-batch
    capacity: float  # bytes of the GPU
    fixed: float  # bytes that do not

    @property
    def total(self) -> float:
        return sum(self.rows.values())

    def fits(self) -> bool:
        return self.total <= self.capacity


def model_config(cfg: Config):
    return cfg.model if cfg.model.vocab_size > 0 else dataclasses.replace(cfg.model, vocab_size=PAPER_VOCAB)


def model_of(cfg: Config):
    model_cfg = model_config(cfg)
    with torch.device("meta"):
        return family_of(model_cfg).build(model_cfg, init_seed=None), model_cfg


def units(model) -> list[list[torch.Tensor]]:
    """The parameters of each FSDP2 unit: every block, and the root (embedding, final norm, head)."""
    in_blocks = {id(p) for block in model.layers for p in block.parameters()}
    return [list(block.parameters()) for block in model.layers] + \
        [[p for p in model.parameters() if id(p) not in in_blocks]]


def chunk_numel(p: torch.Tensor, world: int, rank: int = 0) -> int:
    """Elements of `rank`'s FSDP2 shard of p (torch.chunk along dim 0, as fully_shard splits)."""
    rows = p.shape[0]
    per = math.ceil(rows / world)
    mine = max(0, min(per, rows - rank * per))
    return mine * (p.numel() // rows if rows else 0)


def dtype_bytes(precision: str) -> tuple[int, int, int]:
    """(bytes of a stored parameter, of its gradient and of each Adam state) for the local and FSDP2
    engines: bf16-pure stores all of them in bf16, the others in fp32."""
    return (2, 2, 2) if precision == "bf16-pure" else (4, 4, 4)


def model_states(cfg: Config, model, world: int, rank: int = 0) -> dict[str, float]:
    """Bytes of parameters, gradients, optimizer states and master weights on `rank`."""
    engine, precision = cfg.parallel.engine, cfg.train.precision
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    if engine in ("single", "ddp"):
        pb, gb, sb = dtype_bytes(precision)
        return {"parameters": pb * n, "gradients": gb * n, "optimizer states + master weights": 2 * sb * n}
    if engine == "fsdp":
        pb, gb, sb = dtype_bytes(precision)
        shard = sum(chunk_numel(p, world, rank) for p in params)
        return {"parameters": pb * shard, "gradients": gb * shard, "optimizer states + master weights": 2 * sb * shard}
    return deepspeed_states(cfg, model, world)


def deepspeed_states(cfg: Config, model, world: int) -> dict[str, float]:
    """DeepSpeed ZeRO: weights in the compute dtype (whole for stages 1-2, partitioned for 3), the
    gradients reduced into this rank's partition in the compute dtype, a master copy of the partition
    (fp32, or bf16 under bf16-pure) and two Adam states in the master's dtype. Stages 1-2 flatten each
    optimizer parameter group, padded to a multiple of 2 x ranks; stage 3 partitions each parameter."""
    a = compute_bytes(cfg.train.precision)
    if cfg.parallel.zero_stage == 3:
        part = sum(math.ceil(p.numel() / world) for p in model.parameters())
        weights = a * part
    else:
        groups = [sum(p.numel() for p in g["params"]) for g in param_groups(model, cfg.optim.weight_decay)]
        flat = sum(math.ceil(n / (2 * world)) * 2 * world for n in groups)
        part, weights = flat // world, a * flat
    master = 2 if cfg.train.precision == "bf16-pure" else 4
    return {"parameters": weights, "gradients": a * part, "optimizer states + master weights": 3 * master * part}


def compute_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def communication(cfg: Config, model, world: int) -> float:
    """FSDP2: the all-gathered unit and the prefetched next one (compute dtype), the unsharded
    gradients of one unit and their reduce dtype (fp32) copy; DDP: its gradient buckets (a second
    copy of the gradients); DeepSpeed: its reduce and all-gather buckets (5e8 elements each, its
    default, capped at the model); single: none."""
    engine, a = cfg.parallel.engine, compute_bytes(cfg.train.precision)
    n = sum(p.numel() for p in model.parameters())
    if engine == "single" or world == 1 and engine == "ddp":
        return 0.0
    if engine == "ddp":
        return dtype_bytes(cfg.train.precision)[1] * n
    if engine == "fsdp":
        largest = max(sum(p.numel() for p in unit) for unit in units(model))
        reduce = 4 if cfg.train.precision == "bf16-mixed" else a
        return largest * (2 * a + a + reduce)
    return 2 * a * min(int(5e8), n)


def plan(cfg: Config, world: int, capacity_gib: float, mode: Optional[str] = None) -> Plan:
    mode = mode or cfg.train.activation_checkpointing
    model_cfg = model_config(cfg)  # the activations first: a family or format without a count stops here
    per_sample = family_of(model_cfg).activation_rows(model_cfg, cfg.data.seq_len, mode,
                                                      compute_bytes(cfg.train.precision), cfg.model.flash_attn)
    model, _ = model_of(cfg)
    rows = model_states(cfg, model, world)
    rows["communication buffers"] = communication(cfg, model, world)
    fixed = sum(rows.values())
    rows.update({f"{name}, micro-batch {cfg.train.micro_batch} x {cfg.data.seq_len}": cfg.train.micro_batch * value
                 for name, value in per_sample.items()})
    rows["allocator fragmentation"] = FRAGMENTATION * sum(rows.values())
    rows["CUDA context"] = CUDA_CONTEXT_GIB * GIB
    return Plan(rows, sum(per_sample.values()), capacity_gib * GIB, fixed)


def largest_micro_batch(cfg: Config, world: int, capacity_gib: float, mode: str) -> tuple[int, int]:
    """(the largest micro-batch that fits, the largest of those that divides the per-rank share of the
    global batch, which is what a run can use); 0 where none fits."""
    p = plan(cfg, world, capacity_gib, mode)
    room = p.capacity - CUDA_CONTEXT_GIB * GIB - (1 + FRAGMENTATION) * p.fixed
    most = int(room // ((1 + FRAGMENTATION) * p.per_sample)) if room > 0 else 0
    per_rank = max(cfg.train.global_batch // world, 1)
    return most, max((b for b in range(1, min(most, per_rank) + 1) if per_rank % b == 0), default=0)


def measured_mfu(path: Optional[Path], cfg: Config) -> Optional[float]:
    """The MFU a `bench_gpu.py --json` file measured for this preset shape and method, if any."""
    if not path or not path.is_file():
        return None
    rows = json.loads(path.read_text()).get("rows", [])
    match = [r for r in rows if r.get("method") == cfg.model.method and "mfu" in r
             and str(r.get("shape")) in (cfg.logging.run_dir, f"llama_{model_size(cfg)}")]
    return max(r["mfu"] for r in match) if match else None


def model_size(cfg: Config) -> str:
    return {256: "60m", 768: "130m", 1024: "350m", 2048: "1b", 4096: "7b"}.get(cfg.model.dim, "?")


def timing(cfg: Config, world: int, gpu_name: str, mfu: float) -> dict[str, float]:
    from .tasks.language_modeling import LanguageModeling
    model_cfg = model_config(cfg)
    steps = LanguageModeling.planned_steps(cfg) if cfg.train.token_budget not in ("0", "") else cfg.train.steps
    tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
    family = family_of(model_cfg)
    per_token = family.flops(model_cfg, cfg.data.seq_len)["train"] + \
        family.recompute_flops(model_cfg, cfg.train.activation_checkpointing, cfg.data.seq_len)
    peak = next(v for k, v in PEAK_BF16_FLOPS.items() if k in gpu_name)
    step_s = tokens_per_step * per_token / (world * peak * mfu)
    return {"steps": steps, "tokens": steps * tokens_per_step, "step_s": step_s, "hours": steps * step_s / 3600,
            "gpu_hours": world * steps * step_s / 3600, "flops_per_token": per_token}


def resolve_gpu(name: str) -> tuple[float, str]:
    """(GiB, name for the peak FLOP/s table) of a named GPU or a number of GiB (an H100's speed)."""
    if name.lower() in GPUS:
        return GPUS[name.lower()]
    try:
        return float(name), "H100"
    except ValueError:
        raise ConfigError(f"--gpu {name!r} is unknown ({', '.join(GPUS)}, or a number of GiB)") from None


def verdict(cfg: Config, world: int, gpu: str) -> tuple[bool, str]:
    """(fits, one line): the line names the micro-batch and checkpointing mode that would fit."""
    capacity, _ = resolve_gpu(gpu)
    p = plan(cfg, world, capacity)
    if p.fits():
        return True, f"fits: {p.total / GIB:.1f} of {capacity:.1f} GiB per rank"
    options = [f"{mode} up to {mb}" for mode in CHECKPOINTING_MODES
               if (mb := largest_micro_batch(cfg, world, capacity, mode)[1])]
    would = "; would fit: train.micro_batch with train.activation_checkpointing " + ", ".join(options) if options \
        else "; nothing fits: more GPUs, ZeRO-3/FSDP2 or a larger GPU"
    return False, (f"does not fit: {p.total / GIB:.1f} GiB per rank needed on a {capacity:.1f} GiB GPU at micro-batch "
                   f"{cfg.train.micro_batch}, checkpointing {cfg.train.activation_checkpointing}{would}")


def on_gpu(cfg: Config) -> Config:
    """train.precision auto as a GPU resolves it: bf16-mixed."""
    if cfg.train.precision == "auto":
        cfg.train.precision = "bf16-mixed"
    return cfg


def config_of(argv: list[str]) -> Config:
    """The Config of a training command line (train.py's arguments; others ignored)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_config_arguments(parser)
    return on_gpu(config_from_args(parser.parse_known_args(argv)[0]))


def this_gpu() -> Optional[str]:
    """This machine's first CUDA device's memory in GiB (as --gpu takes it), or None."""
    return str(torch.cuda.get_device_properties(0).total_memory / GIB) if torch.cuda.is_available() else None


def preflight(argv: list[str], world: int, gpu: Optional[str] = None) -> Optional[str]:
    """The one-line refusal of a training command line that cannot fit `world` GPUs of `gpu` (a name
    or GiB; None: this machine's), or None: it fits, there is no GPU, or its family or format does not
    count its activations (Family.activation_rows, Format.saved_bytes), so the plan cannot tell."""
    gpu = gpu or this_gpu()
    if gpu is None:
        return None
    try:
        fits, line = verdict(config_of(argv), world, gpu)
    except (NotImplementedError, ValueError):
        return None
    return None if fits else line


def report(cfg: Config, world: int, gpu: str, mfu: Optional[float], bench: Optional[Path]) -> str:
    capacity, gpu_name = resolve_gpu(gpu)
    p = plan(cfg, world, capacity)
    m = cfg.model
    lines = [f"{m.dim}d x {m.n_layers} blocks, {m.method} rank {m.rank}, LaX {m.lax_gate}; {cfg.parallel.engine}"
             f"{' ZeRO-' + str(cfg.parallel.zero_stage) if cfg.parallel.engine == 'deepspeed' else ''} on {world} x "
             f"{gpu} ({capacity:.1f} GiB), {cfg.train.precision}, attention {'flash-attn' if m.flash_attn else 'SDPA'}",
             "", "| per rank | GiB |", "|---|---|"]
    lines += [f"| {name} | {value / GIB:.2f} |" for name, value in p.rows.items()]
    lines += [f"| **total** | **{p.total / GIB:.2f}** |", "",
              f"{'fits' if p.fits() else 'DOES NOT FIT'}: margin {(p.capacity - p.total) / GIB:+.2f} GiB"]
    fitting = {mode: largest_micro_batch(cfg, world, capacity, mode) for mode in CHECKPOINTING_MODES}
    lines.append("largest micro-batch that fits, by train.activation_checkpointing: " + ", ".join(
        f"{mode} {most} ({usable} divides {cfg.train.global_batch} / {world})"
        for mode, (most, usable) in fitting.items()))
    measured = measured_mfu(bench, cfg)
    mfu_used = mfu or measured or DEFAULT_MFU
    source = "measured by " + str(bench) if measured and not mfu else ("given" if mfu else "assumed")
    t = timing(cfg, world, gpu_name, mfu_used)
    lines.append(f"time at MFU {100 * mfu_used:.0f}% ({source}): {t['steps']:,} steps of "
                 f"{cfg.train.global_batch} x {cfg.data.seq_len} tokens ({t['tokens'] / 1e9:.2f}B tokens), "
                 f"{t['step_s']:.2f} s a step, {t['hours']:.1f} h wall, {t['gpu_hours']:,.0f} GPU-hours "
                 f"({t['flops_per_token'] / 1e9:.2f} GFLOPs a token with recompute)")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=1, help="number of GPUs (ranks)")
    parser.add_argument("--gpu", default="a100-80", help=f"{', '.join(GPUS)}, or a number of GiB")
    parser.add_argument("--mfu", type=float, help=f"model FLOPs utilisation for the time (default: measured in "
                                                  f"--gpu-benchmark, else {DEFAULT_MFU})")
    parser.add_argument("--gpu-benchmark", type=Path, help="a `bench_gpu.py --json` file to read the MFU from")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    try:
        print(report(on_gpu(config_from_args(args)), args.gpus, args.gpu, args.mfu, args.gpu_benchmark))
    except (ConfigError, NotImplementedError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
