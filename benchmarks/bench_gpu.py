"""The first GPU hour: training tokens/s (images/s for a ViT), MFU and peak memory of every scale x
method x LaX, in bf16, with and without torch.compile, through the trainer's own engine (single GPU,
bf16-mixed autocast, fused AdamW, flash-attn when installed):

    python benchmarks/bench_gpu.py                      # llama_350m/1b x dense/cola + LaX x compile off/on (8 runs)
    python benchmarks/bench_gpu.py --shapes llama_60m,llama_350m,llama_1b --methods dense,svd,cola --lax none,identity
    python benchmarks/bench_gpu.py --shapes llama_1b --methods cola --compile on --json out.json
    python benchmarks/bench_gpu.py --shapes vit_b,vit_l --methods dense,svd,cola,tt --lax none,tensor
    python benchmarks/bench_gpu.py --device cpu --shapes llama_micro --steps 2 --warmup 1 --micro-batch 2 --seq-len 32

A ViT shape takes 224 x 224 RGB images and 1,000 classes, with Tables 9-10's ranks (TT + LaX with
intra-layer LaX on q, k, v, o, as the recipe). The same script times the ViT-B variants on a CPU
(docs/BENCHMARKS.md): --device cpu --precision fp32 --shapes vit_b --micro-batch 8.

Peak memory is the CUDA allocator's peak (the process's peak RSS on CPU). MFU is against the GPU's
dense peak in the run's precision (BF16; TF32 or FP32 for fp32, introspection.PEAK_*_FLOPS), or
--peak-flops; on a GPU not in the tables it is left out, with a note. Prints one Markdown table
(paste it into docs/BENCHMARKS.md with the GPU's name). Each configuration starts from a reset
torch.compile cache; one that fails (out of memory, a compile error) is reported as such in its row
and the rest go on; the table and --json are written whatever happens. Timing: `--warmup` steps
(compilation included) are discarded, then `--steps` steps are timed with the device synchronised.
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
from megatron_lax.training.introspection import gpu_peak_flops, peak_flops, peak_memory_gb  # noqa: E402
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


def measure(shape: str, method: str, lax: str, compiled: bool, args, device: torch.device, peak: float) -> dict:
    torch._dynamo.reset()  # every configuration compiles its own graphs: none count against the next's budget
    micro = args.micro_batch or MICRO_BATCH.get(shape, 16)
    cfg = load_config(shape, {**config_overrides(shape, method, lax, args),
                              "train.micro_batch": str(micro), "train.global_batch": str(micro),
                              "train.precision": args.precision, "train.tf32": str(args.tf32),
                              "train.compile": str(compiled),
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
    return {unit: per_s, "mfu": flops_per_item * per_s / peak if peak > 0 else None,
            "peak_memory_gb": peak_memory_gb(device), "micro_batch": micro,
            "params": sum(p.numel() for p in engine.base_model.parameters())}


def run_row(shape: str, method: str, lax: str, compiled: bool, args, device: torch.device, peak: float) -> dict:
    """One configuration's row; a failure is recorded in it (`oom`, or `error`: one line), never raised."""
    row = {"shape": shape, "method": method, "lax": lax if method != "dense" else "-", "compile": compiled}
    try:
        row.update(measure(shape, method, lax, compiled, args, device, peak))
    except torch.cuda.OutOfMemoryError:
        row["oom"] = True
    except Exception as e:  # noqa: BLE001 - e.g. a recompile limit or an inductor error: the rest go on
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def table(rows: list[dict], name: str, args, peak_note: str) -> str:
    flash = "flash-attn" if flash_attn_func is not None and args.device.startswith("cuda") else "SDPA"
    lines = [f"### Training throughput on {name} ({args.precision}, {flash}, LLaMA sequence {args.seq_len})\n",
             *([peak_note, ""] if peak_note else []),
             "| shape | method | LaX | compile | micro-batch | tokens/s or images/s | MFU | peak memory (GB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['shape']} | {r['method']} | {r['lax']} | {r['compile']} |"
        if r.get("oom") or r.get("error"):
            lines.append(f"{head} - | {'OOM' if r.get('oom') else 'error: ' + r['error']} | - | - |")
            continue
        rate = r.get("tokens_per_s") or r.get("images_per_s")
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"{head} {r['micro_batch']} | {rate:,.1f} | {mfu} | {r['peak_memory_gb']:.1f} |")
    return "\n".join(lines)


def device_peak(device: torch.device, name: str, args) -> tuple[float, str]:
    """(peak FLOP/s for MFU, a note for the table when there is none: a GPU not in the tables)."""
    if args.peak_flops > 0 or device.type != "cuda":
        return peak_flops(device, args.peak_flops), ""
    peak = gpu_peak_flops(name, args.precision, args.tf32)
    if peak > 0:
        return peak, ""
    return 0.0, (f"MFU not reported: no peak FLOP/s known for {name!r} in {args.precision}"
                 f"{' with TF32' if args.tf32 else ''}; give it with --peak-flops (dense, per GPU)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama_350m,llama_1b")
    parser.add_argument("--methods", default="dense,cola")
    parser.add_argument("--lax", default="identity", help="LaX gates to try on the low-rank methods")
    parser.add_argument("--compile", default="off,on")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--tf32", action="store_true", help="fp32 matmuls on TF32 tensor cores (MFU against TF32)")
    parser.add_argument("--peak-flops", type=float, default=0.0, help="per-GPU dense peak FLOP/s for MFU")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--micro-batch", type=int, default=0, help="sequences per step (default: per shape)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    peak, peak_note = device_peak(device, name, args)
    if peak_note:
        print(peak_note, file=sys.stderr)
    rows = []
    combos = itertools.product(args.shapes.split(","), args.methods.split(","), args.lax.split(","),
                               [c == "on" for c in args.compile.split(",")])
    try:
        for shape, method, lax, compiled in combos:
            if method == "dense" and lax != args.lax.split(",")[0]:
                continue  # LaX needs a low-rank method: dense is measured once
            rows.append(run_row(shape, method, lax, compiled, args, device, peak))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:  # an interrupted sweep still leaves what it measured
        print(table(rows, name, args, peak_note))
        if args.json:
            args.json.write_text(json.dumps({"device": name, "peak_flops": peak, "rows": rows}, indent=1))

if __name__ == "__main__":
    main()
