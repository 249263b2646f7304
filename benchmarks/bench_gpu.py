"""The first GPU hour: training tokens/s (images/s for a ViT), MFU and peak memory of every scale x
method x LaX, in bf16, with and without torch.compile, through the trainer's own engine (single GPU,
bf16-mixed autocast, fused AdamW, flash-attn when installed):

    python benchmarks/bench_gpu.py                      # llama_60m/350m/1b x dense/svd/cola x LaX off/on x compile off/on
    python benchmarks/bench_gpu.py --shapes llama_1b --methods cola --compile on --json out.json
    python benchmarks/bench_gpu.py --shapes vit_b,vit_l --methods dense,svd,cola,tt --lax none,tensor
    python benchmarks/bench_gpu.py --device cpu --shapes llama_micro --steps 2 --warmup 1 --micro-batch 2 --seq-len 32

A ViT shape takes 224 x 224 RGB images and 1,000 classes, with Tables 9-10's ranks (TT + LaX with
intra-layer LaX on q, k, v, o, as the recipe). The same script times the ViT-B variants on a CPU
(docs/BENCHMARKS.md): --device cpu --precision fp32 --shapes vit_b --micro-batch 8.

Peak memory is the CUDA allocator's peak (the process's peak RSS on CPU). Prints one Markdown table (paste it into docs/BENCHMARKS.md with the GPU's name). A configuration that
runs out of memory is reported as OOM and the rest go on. Timing: `--warmup` steps (compilation
included) are discarded, then `--steps` steps are timed with the device synchronised.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402
from megatron_lax.config import load_config  # noqa: E402
from megatron_lax.training.introspection import peak_flops, peak_memory_gb  # noqa: E402
from megatron_lax.launch import vit_variant  # noqa: E402
from megatron_lax.models import build_model, family_of  # noqa: E402
from megatron_lax.tasks import task_class  # noqa: E402
from megatron_lax.models.llama import flash_attn_func, flops_per_token  # noqa: E402
from megatron_lax.method.init import init_weights  # noqa: E402
from megatron_lax.models.vit import flops_per_image  # noqa: E402
from megatron_lax.parallel import ModelRecipe, build_engine  # noqa: E402
from megatron_lax.parallel.distributed import DistInfo  # noqa: E402

MICRO_BATCH = {"llama_micro": 32, "llama_tiny": 32, "llama_60m": 64, "llama_130m": 64, "llama_350m": 32, "llama_1b": 16,
               "vit_b": 128, "vit_l": 64}


def config_overrides(shape: str, method: str, lax: str, args) -> dict:
    gate = lax if method != "dense" else "none"
    if not shape.startswith("vit"):
        return {"model.method": method, "model.lax_gate": gate, "model.vocab_size": str(args.vocab),
                "data.seq_len": str(args.seq_len)}
    return {**vit_variant(shape, method, gate), "model.num_classes": "1000", "model.in_channels": "3"}


def random_batch(cfg, micro: int, args, device: torch.device):
    """(inputs, targets, items per step, training FLOPs per item): token sequences or images."""
    if not family_of(cfg.model).uses_tokenizer:
        size = cfg.model.image_size
        images = torch.randn(micro, cfg.model.in_channels, size, size, device=device)
        labels = torch.randint(0, cfg.model.num_classes, (micro,), device=device)
        return images, labels, micro, flops_per_image(cfg.model)["train"]
    tokens = torch.randint(0, args.vocab, (micro, args.seq_len + 1), device=device)
    return tokens[:, :-1], tokens[:, 1:], micro * args.seq_len, flops_per_token(cfg.model, args.seq_len)["train"]


def measure(shape: str, method: str, lax: str, compiled: bool, args, device: torch.device) -> dict:
    micro = args.micro_batch or MICRO_BATCH.get(shape, 16)
    cfg = load_config(shape, {**config_overrides(shape, method, lax, args),
                              "train.micro_batch": str(micro), "train.global_batch": str(micro),
                              "train.precision": args.precision, "train.compile": str(compiled),
                              "parallel.engine": "single"})
    dist = DistInfo(0, 1, 0, device)
    engine = build_engine(cfg, ModelRecipe(lambda: build_model(cfg.model, init_seed=None),
                                           lambda model: init_weights(model, 0)), dist,
                          family_of(cfg.model).loss)
    inputs, targets, items, flops_per_item = random_batch(cfg, micro, args, device)
    weight = 1.0 / items

    def step():
        engine.forward_backward(inputs, targets, weight, sync=True)
        engine.step(1e-4)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    per_s = args.steps * items / (time.perf_counter() - start)
    unit = f"{task_class(cfg).unit}_per_s"
    return {unit: per_s, "mfu": flops_per_item * per_s / peak_flops(device), "peak_memory_gb": peak_memory_gb(device),
            "micro_batch": micro, "params": sum(p.numel() for p in engine.base_model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama_60m,llama_350m,llama_1b")
    parser.add_argument("--methods", default="dense,svd,cola")
    parser.add_argument("--lax", default="none,identity", help="LaX gates to try on the low-rank methods")
    parser.add_argument("--compile", default="off,on")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--micro-batch", type=int, default=0, help="sequences per step (default: per shape)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    rows = []
    combos = itertools.product(args.shapes.split(","), args.methods.split(","), args.lax.split(","),
                               [c == "on" for c in args.compile.split(",")])
    for shape, method, lax, compiled in combos:
        if method == "dense" and lax != args.lax.split(",")[0]:
            continue  # LaX needs a low-rank method: dense is measured once
        row = {"shape": shape, "method": method, "lax": lax if method != "dense" else "-", "compile": compiled}
        try:
            row.update(measure(shape, method, lax, compiled, args, device))
        except torch.cuda.OutOfMemoryError:
            row["oom"] = True
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    flash = "flash-attn" if flash_attn_func is not None and device.type == "cuda" else "SDPA"
    print(f"### Training throughput on {name} ({args.precision}, {flash}, LLaMA sequence {args.seq_len})\n")
    print("| shape | method | LaX | compile | micro-batch | tokens/s or images/s | MFU | peak memory (GB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("oom"):
            print(f"| {r['shape']} | {r['method']} | {r['lax']} | {r['compile']} | - | OOM | - | - |")
        else:
            rate = r.get("tokens_per_s") or r.get("images_per_s")
            print(f"| {r['shape']} | {r['method']} | {r['lax']} | {r['compile']} | {r['micro_batch']} | "
                  f"{rate:,.1f} | {100 * r['mfu']:.1f}% | {r['peak_memory_gb']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
