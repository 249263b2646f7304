"""benchmarks/bench_gpu.py must work the first time a GPU is lent: here it runs on the CPU at a tiny size."""
from __future__ import annotations

import json
import sys

from conftest import run_command


def test_gpu_benchmark_runs_and_reports_every_configuration(tmp_path):
    result = run_command([sys.executable, "benchmarks/bench_gpu.py", "--device", "cpu", "--shapes", "llama_micro",
                          "--methods", "dense,cola", "--lax", "identity", "--compile", "off", "--steps", "1",
                          "--warmup", "1", "--micro-batch", "2", "--seq-len", "16", "--vocab", "256",
                          "--json", str(tmp_path / "rows.json")])
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [(r["method"], r["lax"]) for r in rows] == [("dense", "-"), ("cola", "identity")]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_memory_gb"] > 0 for r in rows)
    assert "| llama_micro | cola | identity | False | 2 |" in result.stdout


def test_gpu_benchmark_times_the_vit_variants(tmp_path):
    run_command([sys.executable, "benchmarks/bench_gpu.py", "--device", "cpu", "--shapes", "vit_micro", "--methods",
                 "dense,tt", "--lax", "tensor", "--compile", "off", "--steps", "1", "--warmup", "1", "--micro-batch",
                 "2", "--precision", "fp32", "--json", str(tmp_path / "rows.json")])
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [(r["method"], r["lax"]) for r in rows] == [("dense", "-"), ("tt", "tensor")]
    assert all(r["images_per_s"] > 0 and 0 < r["mfu"] < 1 for r in rows)


def load_bench():
    import importlib.util
    from conftest import REPO
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "benchmarks" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_compiled_configuration_starts_a_fresh_compile_budget_and_failures_stay_in_their_row(
        tmp_path, monkeypatch, capsys):
    """Without a dynamo reset between configurations their graphs add up past the recompile limit
    (here 2: one configuration's training graphs); a failing configuration leaves the rest and the outputs."""
    import functools
    import torch
    bench = load_bench()
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    with torch._dynamo.config.patch(recompile_limit=2):
        bench.main(["--device", "cpu", "--shapes", "llama_micro,no_such_shape,llama_micro", "--methods", "cola",
                    "--lax", "identity,dense", "--compile", "on", "--steps", "1", "--warmup", "1", "--micro-batch",
                    "2", "--seq-len", "16", "--vocab", "256", "--json", str(tmp_path / "rows.json")])
    torch._dynamo.reset()
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [("error" in r, r["shape"]) for r in rows] == [(False, "llama_micro")] * 2 + [(True, "no_such_shape")] * 2 \
        + [(False, "llama_micro")] * 2, rows
    assert "| no_such_shape | cola | dense | True | - | error: " in capsys.readouterr().out


def test_an_unknown_gpu_gets_a_note_instead_of_mfu():
    import argparse
    import torch
    bench = load_bench()
    args = argparse.Namespace(peak_flops=0.0, precision="bf16-mixed", tf32=False)
    assert bench.device_peak(torch.device("cuda"), "NVIDIA H100 NVL", args) == (835e12, "")
    peak, note = bench.device_peak(torch.device("cuda"), "Some Future GPU", args)
    assert peak == 0.0 and note.startswith("MFU not reported: no peak FLOP/s known for 'Some Future GPU'")
    row = {"shape": "s", "method": "cola", "lax": "identity", "compile": False, "tokens_per_s": 10.0, "mfu": None,
           "peak_memory_gb": 1.0, "micro_batch": 2}
    assert "| 2 | 10.0 | - | 1.0 |" in bench.table([row], "gpu", argparse.Namespace(
        precision="bf16-mixed", device="cuda", seq_len=16), note)
