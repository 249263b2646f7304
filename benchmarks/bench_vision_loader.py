"""The ViT input pipeline at ImageNet scale: images/s per loader worker for a recipe's training
transform, and the training process's CPU time per image, on ImageNet-sized JPEGs it writes itself.

    python benchmarks/bench_vision_loader.py [--recipe official|deit] [--images 300] [--workers 2]

The images: 500 x 375 and the other common ImageNet shapes, with natural-image statistics (a 1/f
amplitude spectrum, correlated colour channels, a few hard-edged shapes), saved as quality-90 JPEGs,
into a temporary directory that is removed afterwards.

Measured:
- per worker: one process runs the training transform (decode, random-resized crop, flip, the recipe's
  AutoAugment or RandAugment) over every image several times; images per CPU-second of that process is
  what one worker core delivers (CPU time, so other load on the machine does not count), split into
  decoding + crop and the rest;
- the training process: ImageTrainLoader with --workers processes hands over --micro-batch images at a
  time; the CPU time of the training process (all its threads: the DataLoader's receiving, pinning when
  CUDA is present, the mixing plan) per image, and the workers' CPU per image as the end-to-end check;
- the device-side step (normalise, erase, mix) on this CPU, for reference: on a GPU it is a few kernels.
Targets (docs/BENCHMARKS.md): at least 150 images/s per worker core, at most 0.5 ms of training-process
CPU per image. The arithmetic for 8 x A100 follows from ViT-B's FLOPs per training image.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron_lax.data import images as vision_data  # noqa: E402
from megatron_lax.config import load_config  # noqa: E402
from megatron_lax.launch import VIT_RECIPES  # noqa: E402
from megatron_lax.models.vit import flops_per_image  # noqa: E402
from megatron_lax.tasks.image_classification import augment_config  # noqa: E402

SHAPES = [(500, 375), (500, 333), (375, 500), (500, 400), (500, 500), (333, 500)]  # ImageNet's commonest
A100_PEAK = {"bf16": 312e12, "tf32": 156e12}  # dense tensor-core FLOP/s


def natural_image(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """1/f noise (the amplitude spectrum of natural images) in a luminance and two weaker colour
    channels, plus a few filled shapes with hard edges."""
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    falloff = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(width, height))
    planes = []
    for strength in (1.0, 0.35, 0.35):
        spectrum = (rng.normal(size=falloff.shape) + 1j * rng.normal(size=falloff.shape)) * falloff
        plane = np.fft.irfft2(spectrum, s=(height, width))
        planes.append(strength * plane / plane.std())
    y, u, v = planes
    rgb = np.stack([y + 1.4 * v, y - 0.35 * u - 0.7 * v, y + 1.8 * u], -1) * 40 + rng.uniform(90, 160, 3)
    image = Image.fromarray(np.uint8(np.clip(rgb, 0, 255)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        box = [x0, y0, x0 + rng.uniform(20, width / 2), y0 + rng.uniform(20, height / 2)]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def write_images(root: Path, n: int, classes: int = 4) -> float:
    """n JPEGs in root/train/<class>/; returns their mean size in bytes."""
    rng = np.random.default_rng(0)
    sizes = []
    for i in range(n):
        folder = root / "train" / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.JPEG"
        natural_image(*SHAPES[i % len(SHAPES)], rng).save(path, "JPEG", quality=90)
        sizes.append(path.stat().st_size)
    return float(np.mean(sizes))


def recipe_augment(recipe: str, image_size: int = 224) -> vision_data.AugmentConfig:
    overrides = {k: v for k, v in VIT_RECIPES[recipe].items() if k.startswith("augment.")}
    return augment_config(load_config("vit_b", {**overrides, "model.image_size": str(image_size)}), train=True)


def per_worker_rate(dataset, augment, passes: int) -> dict:
    """Images per CPU-second of one process: the whole transform, and decoding + crop alone."""
    transform = vision_data.SampleTransform(augment, dataset.channels)
    decode_only = vision_data.SampleTransform(vision_data.dataclasses.replace(augment, auto_augment="", randaugment_n=0,
                                                                              hflip=0.0), dataset.channels)
    rates = {}
    for name, t in (("transform", transform), ("decode_crop", decode_only)):
        start, wall = time.process_time(), time.perf_counter()
        for epoch in range(passes):
            for i in range(len(dataset)):
                pixels, _, why = t.sample(dataset, i, np.random.default_rng([0, epoch, i]))
                assert pixels is not None, why
        cpu = time.process_time() - start
        rates[name] = passes * len(dataset) / cpu
        rates[f"{name}_wall"] = passes * len(dataset) / (time.perf_counter() - wall)
    return rates


def training_process(dataset, augment, workers: int, micro_batch: int, batches: int, prefetch: int = 2) -> dict:
    """CPU per image of this (the training) process while it takes `batches` micro-batches from the
    loader (after a first one, which waits for the workers to start), and of its workers over their
    whole life: at most the batches taken, at least those plus what they prefetched beyond them."""
    pin = torch.cuda.is_available()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    loader = vision_data.ImageTrainLoader(dataset, augment, micro_batch, micro_batch, workers=workers,
                                          num_classes=1000, pin_memory=pin, prefetch=prefetch)
    device = torch.device("cuda" if pin else "cpu")
    next(loader)
    start, wall, images = time.process_time(), time.perf_counter(), 0
    plans = []
    for _ in range(batches):
        x, plan = next(loader)
        x = x.to(device, non_blocking=True)
        images += len(x)
        plans.append((x, plan))
    cpu, seconds = time.process_time() - start, time.perf_counter() - wall
    loader._batches = None  # stops the workers, so that their CPU time is counted
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    taken = (batches + 1) * micro_batch
    start = time.process_time()
    for x, _ in plans:  # what pinning adds per batch on a GPU machine: one copy into a page-locked buffer
        torch.empty_like(x).copy_(x)
    staging = (time.process_time() - start) / images
    start = time.process_time()
    for x, plan in plans:
        loader.batch_augment(x, plan)
    device_side = (time.process_time() - start) / images
    return {"cpu_per_image": cpu / images, "images_per_s": images / seconds, "pinned": pin, "staging": staging,
            "worker_cpu": (worker_cpu / (taken + workers * prefetch * micro_batch), worker_cpu / taken),
            "device_side_per_image": device_side}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(VIT_RECIPES), default="official")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--passes", type=int, default=2, help="passes over the images for the per-worker rate")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=16, help="micro-batches timed in the training process")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation on an A100")
    args = parser.parse_args()
    torch.set_num_threads(1)
    augment = recipe_augment(args.recipe)
    with tempfile.TemporaryDirectory() as tmp:
        mean_bytes = write_images(Path(tmp), args.images)
        dataset = vision_data.open_image_dataset(tmp, "train")
        worker = per_worker_rate(dataset, augment, args.passes)
        main_process = training_process(dataset, augment, args.workers, args.micro_batch, args.batches)
    rate = worker["transform"]
    cpu_ms = main_process["cpu_per_image"] * 1e3
    aug = "AutoAugment (original)" if augment.auto_augment else f"RandAugment {augment.randaugment_n} x {augment.randaugment_m}"
    print(f"recipe {args.recipe}: random-resized crop 224 + flip + {aug}; {args.images} JPEGs of "
          f"{mean_bytes / 1024:.0f} KiB on average ({', '.join(f'{w}x{h}' for w, h in SHAPES)})\n")
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| images/s per worker core (CPU time; whole transform) | {rate:.0f} | >= 150 |")
    print(f"| images/s per worker core, decode + crop only | {worker['decode_crop']:.0f} | |")
    print(f"| images/s of one process, wall clock (shared machine) | {worker['transform_wall']:.0f} | |")
    print(f"| training-process CPU per image, {args.workers} workers, micro-batch {args.micro_batch}"
          f"{' (pinned)' if main_process['pinned'] else ''} | {cpu_ms:.3f} ms | <= 0.5 ms |")
    low, high = (v * 1e3 for v in main_process["worker_cpu"])
    if not main_process["pinned"]:
        print(f"| + copying each batch once more, as pinning does on a GPU machine | "
              f"{main_process['staging'] * 1e3:.3f} ms | |")
    print(f"| worker CPU per image in the loader (start-up and IPC included) | {low:.1f}-{high:.1f} ms | |")
    print(f"| loader images/s with {args.workers} workers, wall clock | {main_process['images_per_s']:.0f} | |")
    print(f"| device-side normalise + erase + mix on this CPU, per image | "
          f"{main_process['device_side_per_image'] * 1e3:.2f} ms | (a few kernels on a GPU) |")
    cfg = load_config("vit_b", {"model.num_classes": "1000", "model.in_channels": "3"}).model
    train_flops = flops_per_image(cfg)["train"]
    print(f"\n8 x A100, dense ViT-B/16 ({train_flops / 1e9:.0f} GFLOPs per training image) at {args.mfu:.0%} MFU:")
    for precision, peak in A100_PEAK.items():
        per_gpu = peak * args.mfu / train_flops
        print(f"- {precision} ({peak / 1e12:.0f} TFLOP/s peak): {per_gpu:.0f} images/s per GPU, {8 * per_gpu:,.0f} "
              f"on 8; {per_gpu / rate:.1f} worker cores per GPU feed it (10 workers supply {10 * rate:.0f}/s); the "
              f"training process spends {per_gpu * cpu_ms / 1e3:.2f} CPU-s per second on it")
    print(f"- 300 epochs of ImageNet-1k (1,281,167 images) at {8 * A100_PEAK['bf16'] * args.mfu / train_flops:,.0f} "
          f"images/s: {300 * 1_281_167 / (8 * A100_PEAK['bf16'] * args.mfu / train_flops) / 86400:.1f} days")


if __name__ == "__main__":
    main()
