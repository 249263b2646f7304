"""One stage of the first-GPU device check (benchmarks/gpu_check.sh runs them all, each in a process of
its own under its own time limit):

    python benchmarks/gpu_check.py STAGE --out DIR [--dry]

Stages, each writing DIR/STAGE.json (and what it prints to DIR/STAGE.log, by gpu_check.sh):
- versions: torch, CUDA, flash-attn, the GPU's name and dense peak FLOP/s;
- attention: flash-attn and SDPA, MHA and GQA, forward and backward, eager and compiled, against a
  float64 reference;
- throughput_eager, throughput_compiled: tokens/s, MFU and peak memory of llama_1b CoLA + LaX in bf16
  (benchmarks/bench_gpu.py), without and with torch.compile;
- trainer: the trainer with compile and LaX statistics for 30 steps with evaluation on the shipped
  sample, counting compiled graphs and the host reads (and, on a GPU, the synchronisations that
  torch.cuda.set_sync_debug_mode reports) of every step that does not log;
- fsdp: FSDP2 on one rank (NCCL on a GPU) with activation checkpointing, a checkpoint and a resume;
- vit_loader: the ViT recipe's loader (benchmarks/bench_vision_loader.py), pinned batches for the GPU.
--dry runs the same stages on the CPU at tiny shapes (fp32, torch.compile's graphs run eagerly), so
the script is known to run before a GPU is at hand (tests/benchmarks/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_lax.training.introspection import counting_host_reads, gpu_peak_flops  # noqa: E402


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def eager_graphs_when_dry(dry: bool) -> None:
    """Dry runs compile with dynamo but run the graphs eagerly: inductor's C++ build takes minutes on a CPU."""
    if dry:
        torch.compile = functools.partial(torch.compile, backend="eager")


def run(command: list[str], timeout: float = 3600) -> dict:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    print(result.stdout[-4000:], result.stderr[-4000:], sep="\n")
    return {"command": " ".join(command), "returncode": result.returncode}


# --- stages ---------------------------------------------------------------------------------------

def versions(out: Path, dry: bool) -> dict:
    try:
        import flash_attn
        flash = flash_attn.__version__
    except ImportError:
        flash = None
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "flash_attn": flash, "gpu": name,
            "peak_bf16_flops": gpu_peak_flops(name), "peak_tf32_flops": gpu_peak_flops(name, "fp32", tf32=True)}


def attention(out: Path, dry: bool) -> dict:
    """Max |error| of each implementation's output and input gradients against a float64 reference."""
    eager_graphs_when_dry(dry)
    from megatron_lax.models import llama
    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    batch, length, heads, head_dim = (2, 256, 8, 64) if not dry else (2, 16, 4, 8)
    results = {}
    for kind, kv_heads in (("mha", heads), ("gqa", heads // 4)):
        q = torch.randn(batch, length, heads, head_dim, device=dev)
        k, v = (torch.randn(batch, length, kv_heads, head_dim, device=dev) for _ in range(2))
        reference = [t.double().requires_grad_() for t in (q, k, v)]
        expected = llama.attention(*reference, use_flash=False)
        expected.sum().backward()
        for name, use_flash in (("sdpa", False), ("flash_attn", True)):
            if use_flash and llama.flash_attn_func is None:
                results[f"{kind}/{name}"] = "flash-attn not installed"
                continue
            for compiled in (False, True):
                inputs = [t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v)]
                function = functools.partial(llama.attention, use_flash=use_flash)
                if compiled:
                    function = torch.compile(function, fullgraph=True)
                try:
                    got = function(*inputs)
                    got.float().sum().backward()
                    errors = [(got.double() - expected).abs().max().item()] + [
                        (i.grad.double() - r.grad).abs().max().item() for i, r in zip(inputs, reference)]
                    results[f"{kind}/{name}/{'compiled' if compiled else 'eager'}"] = {
                        "max_error_out_dq_dk_dv": errors, "flash_used": llama.flash_attn_usable(inputs[0], use_flash)}
                except Exception as e:  # noqa: BLE001 - recorded, the other variants go on
                    results[f"{kind}/{name}/{'compiled' if compiled else 'eager'}"] = f"{type(e).__name__}: {e}"
    return results


def throughput(out: Path, dry: bool, compiled: bool) -> dict:
    """llama_1b CoLA + LaX (identity gate), bf16-mixed, through benchmarks/bench_gpu.py."""
    eager_graphs_when_dry(dry)
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_gpu
    json_path = out / f"throughput_{'compiled' if compiled else 'eager'}_rows.json"
    args = ["--shapes", "llama_1b", "--methods", "cola", "--lax", "identity", "--compile", "on" if compiled else "off",
            "--steps", "10", "--warmup", "3", "--json", str(json_path)]
    if dry:
        args += ["--device", "cpu", "--shapes", "llama_micro", "--precision", "fp32", "--steps", "1", "--warmup", "1",
                 "--micro-batch", "2", "--seq-len", "16", "--vocab", "256"]
    bench_gpu.main(args)
    return json.loads(json_path.read_text())


def sample_run(out: Path, name: str, dry: bool, **extra) -> dict:
    """Overrides of a run on the shipped sample (prepared into DIR on first use)."""
    shape = {"model.dim": "64", "model.n_layers": "12", "model.n_heads": "2", "model.ffn_dim": "128",
             "model.rank": "16", "data.seq_len": "32", "train.micro_batch": "4", "train.global_batch": "8"} if dry \
        else {"model.dim": "512", "model.n_layers": "12", "model.n_heads": "8", "model.ffn_dim": "1376",
              "model.rank": "128", "data.seq_len": "256", "train.micro_batch": "16", "train.global_batch": "32"}
    return {**shape, "model.method": "cola", "model.lax_gate": "identity", "data.path": str(out / "prepared"),
            "data.raw": str(REPO / "data" / "sample"), "data.tokenizer": str(REPO / "tokenizer" / "sample"),
            "train.eval_tokens": "2048", "logging.run_dir": str(out / name), "logging.progress": "false",
            "logging.tensorboard": "false", "checkpoint.overwrite": "true", **extra}


def trainer(out: Path, dry: bool) -> dict:
    """30 compiled steps with LaX statistics and evaluation every 10 (dry: 6, every 2); per step that does
    not log: host reads and, on a GPU, the synchronisations torch.cuda.set_sync_debug_mode reports."""
    eager_graphs_when_dry(dry)
    from torch._dynamo.utils import counters

    from megatron_lax.config import load_config
    from megatron_lax.train import make_trainer
    from megatron_lax.training.trainer import fit_counting_per_step
    steps, every = (6, 2) if dry else (30, 10)
    cfg = load_config("llama_tiny", sample_run(out, "trainer_run", dry, **{
        "train.compile": "true", "train.steps": str(steps), "train.eval_every": str(every),
        "logging.log_every": str(every), "logging.lax_stats_every": str(every)}))
    run = make_trainer(cfg)
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn")
    with counting_host_reads() as reads, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        summary, per_step = fit_counting_per_step(run, lambda: (reads["count"], sum(
            "synchroniz" in str(w.message) for w in caught)))
        seconds = time.perf_counter() - start
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode(0)
    quiet = {step: {"host_reads": reads_, "syncs": syncs} for step, (reads_, syncs) in per_step.items() if step % every}
    return {"summary": summary, "seconds": seconds, "graphs": counters["stats"]["unique_graphs"],
            "quiet_steps": quiet, "ok": all(v == {"host_reads": 0, "syncs": 0} for v in quiet.values())}


def fsdp(out: Path, dry: bool) -> dict:
    """FSDP2 on one rank with activation checkpointing: 10 steps paused at 5 (a checkpoint), then resumed."""
    overrides = sample_run(out, "fsdp_run", dry, **{
        "parallel.engine": "fsdp", "train.activation_checkpointing": "true", "train.steps": "10",
        "checkpoint.every": "5", "logging.log_every": "5", "train.eval_every": "5", "model.n_layers": "2" if dry else "12",
        "train.precision": "fp32" if dry else "bf16-mixed"})
    arguments = [a for key, value in overrides.items() for a in (f"--{key}", value)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                "--master_port", "29512", "-m", "megatron_lax.train", "--config", "llama_tiny", *arguments]
    first = run(torchrun + ["--train.stop_after", "5"] + (["--train.steps", "6"] if dry else []))
    resumed = run(torchrun + ["--checkpoint.overwrite", "false", "--checkpoint.resume", "auto"]
                  + (["--train.steps", "6"] if dry else []))
    finished = out / "fsdp_run" / "finished.json"
    return {"first": first, "resumed": resumed,
            "summary": json.loads(finished.read_text()) if finished.is_file() else None}


def vit_loader(out: Path, dry: bool) -> dict:
    size = ["--images", "8", "--passes", "1", "--workers", "1", "--micro-batch", "4", "--batches", "2"] if dry \
        else ["--images", "200", "--workers", "4", "--micro-batch", "128", "--batches", "8"]
    return run([sys.executable, "benchmarks/bench_vision_loader.py", *size])


STAGES = {"versions": versions, "attention": attention,
          "throughput_eager": functools.partial(throughput, compiled=False),
          "throughput_compiled": functools.partial(throughput, compiled=True),
          "trainer": trainer, "fsdp": fsdp, "vit_loader": vit_loader}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry", action="store_true", help="on the CPU at tiny shapes")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = STAGES[args.stage](args.out, args.dry)
    (args.out / f"{args.stage}.json").write_text(json.dumps(result, indent=1, default=str))
    failed = isinstance(result, dict) and (result.get("ok") is False or result.get("returncode", 0) != 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
