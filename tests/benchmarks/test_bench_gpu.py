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
