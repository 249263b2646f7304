"""Host memory of loading a LLaMA-7B/13B-shaped base for LoRA / LaX-LoRA fine-tuning, measured on a
CPU without weights, and the GPU memory per rank that follows from it:

    python benchmarks/bench_load_7b.py [--shapes 7b 13b] [--world-size 8] [--rank 32] [--lax-gate linear]

Each case runs in a fresh process and reports its peak resident set size (ru_maxrss):

- `meta`: the adapted model (`LlamaLax` + `apply_lora`) built on the meta device, as
  `loading.finetuned.finetune_recipe` builds it for FSDP2 (ZeRO-3 builds it inside zero.Init): structure only.
- `fill rank 0 of N`: then, parameter by parameter, what `finetune_recipe`'s initialize and
  `assign_parameters` do on rank 0 of an N-rank FSDP2 run: one full tensor in the base's dtype (bf16,
  as a reader of a safetensors file returns it; here filled with a constant instead of read), rank 0's
  row slice copied into its own shard, the full tensor released. Frozen shards are kept in bf16,
  adapter shards in fp32, on the CPU (on a GPU they would live in GPU memory instead).
- The previous path is computed, not run: every rank read the whole model, converted it to fp32 and
  kept it (4 bytes per parameter) before moving it to its GPU.

The GPU memory per rank is arithmetic over the shapes (no GPU was used): frozen bf16 shard +
adapters (fp32 weights, gradients and two Adam moments: 16 bytes per parameter, sharded) + one block
gathered in bf16 for compute (FSDP2 gathers a block at a time). Activations are not included.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHAPES = {  # LLaMA-7B and LLaMA-13B (Touvron et al., 2023)
    "7b": dict(dim=4096, n_layers=32, n_heads=32, ffn_dim=11008, vocab_size=32000),
    "13b": dict(dim=5120, n_layers=40, n_heads=40, ffn_dim=13824, vocab_size=32000),
}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def build(shape: str, rank: int, gate: str):
    import torch

    from megatron_lax.config import LoraConfig, ModelConfig
    from megatron_lax.models.lora import apply_lora
    from megatron_lax.models.llama import LlamaLax

    with torch.device("meta"):
        model = LlamaLax(ModelConfig(method="dense", **SHAPES[shape]), init_seed=None)
        return apply_lora(model, LoraConfig(rank=rank, alpha=2 * rank, lax_gate=gate), init=False)


def case(shape: str, rank: int, gate: str, world_size: int) -> dict:
    """Runs in the child process."""
    import torch

    baseline = peak_rss_gib()
    model = build(shape, rank, gate)
    after_build = peak_rss_gib()
    out = {"shape": shape, "parameters": sum(p.numel() for p in model.parameters()),
           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "rss_after_imports_gib": baseline, "rss_meta_build_gib": after_build}
    if world_size:
        shards = []
        with torch.no_grad():
            for _, p in model.named_parameters():
                full = torch.empty(p.shape, dtype=torch.bfloat16).fill_(0.01)  # what the reader returns
                rows = -(-p.shape[0] // world_size)  # FSDP2 shards dim 0, rank 0 keeps the first chunk
                dtype = torch.float32 if p.requires_grad else torch.bfloat16
                shards.append(full[:rows].to(dtype).clone())
                del full
        out["shard_bytes"] = sum(s.numel() * s.element_size() for s in shards)
        out["rss_fill_rank0_gib"] = peak_rss_gib()
        out["world_size"] = world_size
    return out


def run_case(shape: str, rank: int, gate: str, world_size: int) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r});"
            f"from bench_load_7b import case; print(json.dumps(case({shape!r}, {rank}, {gate!r}, {world_size})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    return json.loads(result.stdout.strip().splitlines()[-1])


def gpu_per_rank_gib(r: dict, shape: str, world_size: int) -> float:
    s = SHAPES[shape]
    frozen = r["parameters"] - r["trainable"]
    block = 4 * s["dim"] ** 2 + 3 * s["dim"] * s["ffn_dim"]
    return (2 * frozen / world_size + 16 * r["trainable"] / world_size + 2 * block) / 2**30


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["7b", "13b"], choices=list(SHAPES))
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--lax-gate", default="linear")
    args = parser.parse_args(argv)
    print("| shape | parameters | trainable | peak RSS: imports | meta build | fill rank 0 of "
          f"{args.world_size} (FSDP2 shards) | previous path (fp32 whole model per rank) | GPU per rank (computed) |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        r = run_case(shape, args.rank, args.lax_gate, args.world_size)
        previous = 4 * r["parameters"] / 2**30
        print(f"| {shape} | {r['parameters'] / 1e9:.2f}B | {r['trainable'] / 1e6:.1f}M | "
              f"{r['rss_after_imports_gib']:.2f} GiB | {r['rss_meta_build_gib']:.2f} GiB | "
              f"{r['rss_fill_rank0_gib']:.2f} GiB (shards {r['shard_bytes'] / 2**30:.2f} GiB) | "
              f"{previous:.1f} GiB (computed) | {gpu_per_rank_gib(r, shape, args.world_size):.2f} GiB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
