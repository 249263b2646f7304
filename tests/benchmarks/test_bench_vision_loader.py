"""benchmarks/bench_vision_loader.py runs end to end at a tiny size, and its images look like photos to JPEG."""
from __future__ import annotations

import sys

import numpy as np

from conftest import REPO, run_command


def test_vision_loader_benchmark_reports_rates_and_cpu(tmp_path):
    result = run_command([sys.executable, "benchmarks/bench_vision_loader.py", "--images", "12", "--passes", "1",
                          "--workers", "1", "--micro-batch", "4", "--batches", "2"])
    out = result.stdout
    assert "AutoAugment (original)" in out and "| images/s per worker core (CPU time; whole transform) |" in out
    assert "| training-process CPU per image, 1 workers, micro-batch 4 |" in out and "8 x A100" in out


def test_synthetic_images_compress_like_natural_ones():
    """1/f noise with edges: a quality-90 JPEG of 500 x 375 takes tens of KiB (ImageNet averages about
    110 KiB at about 400 x 350), unlike white noise (hundreds) or a flat image (a few)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import io

    from bench_vision_loader import natural_image
    buffer = io.BytesIO()
    natural_image(500, 375, np.random.default_rng(0)).save(buffer, "JPEG", quality=90)
    assert 30_000 < len(buffer.getvalue()) < 200_000
