"""Image classification data for the ViT runs: ImageNet-style class folders or Fashion-MNIST idx files,
DeiT's or the official LaX command's augmentation, and a train loader whose resume is exact.

Layouts (open_image_dataset picks one from what the directory holds):
- class folders: root/{train,val}/<class>/<image>; the classes are train's sorted folder names.
- idx files: root/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (Fashion-MNIST); val/test = t10k.

The work is split where it is cheapest. Loader workers decode each image and crop, flip and
AutoAugment/RandAugment it on uint8 pixels (image_augment.py; JPEGs decoded at reduced scale where the
crop loses nothing), and hand over uint8 (b, S, S, C) micro-batches, pinned when the GPU is the
destination. One DataLoader serves the whole run: its sampler walks the epochs on from the resume
position, so workers stay up and prefetch across epoch boundaries. The training process only draws
each micro-batch's mixing parameters (a few numbers; MixPlan) and, on the training device, BatchAugment
normalises the pixels, erases and mixes (mixup or cutmix) them and builds the soft targets.

As in data.py, the order of an epoch is a permutation seeded by (seed, epoch); optimizer step s uses
positions [s*G, (s+1)*G) of it and rank r takes the r-th contiguous slice of G / world_size, in
micro-batches, so a step's samples do not depend on the number of ranks. The per-image augmentation of
sample i is seeded by (seed, epoch, i) in whichever process decodes it, and erasing and mixing of a
micro-batch by (seed, epoch, step, its position in the epoch). The loader's state is therefore just
(epoch, step, micro) and resume is bitwise exact on the same kind of device, also onto another number of
ranks at a step boundary (with the same micro_batch, since mixing pairs images within a micro-batch).

Training targets come back as soft (B, num_classes) distributions (label smoothing and mixup/cutmix
applied), so the loss is -(targets * log_softmax(logits)).sum(-1).mean(); validation labels are int64.
An image that is missing or does not decode is dropped from its batch and counted, never replaced.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .readers import find_idx_file, read_idx  # noqa: F401 (read_idx: the tests' and tools' import)

from . import image_augment
from .cursor import GlobalBatchCursor, permutation_order

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IDX_PREFIX = {"train": "train", "val": "t10k", "test": "t10k"}
_SAMPLE, _BATCH, _HOLDOUT = 0, 1, 2  # seed-stream tags


# --- datasets --------------------------------------------------------------------------------------

class ImageDataset:
    """Labelled images; subclasses set class_names and channels and define __len__, label() and open()."""
    class_names: list[str]
    channels: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def mode(self) -> str:
        return "RGB" if self.channels == 3 else "L"

    def label(self, i: int) -> int:
        raise NotImplementedError

    def open(self, i: int) -> Image.Image:
        """Image i, opened but not yet decoded (a context manager); raises for a missing or unreadable file."""
        raise NotImplementedError

    def read(self, i: int) -> tuple[torch.Tensor | None, int, str]:
        """(uint8 C x H x W image, label, "") or (None, label, why: "missing" or "corrupt")."""
        label = self.label(i)
        try:
            with self.open(i) as image:
                pixels = np.array(image.convert(self.mode))
        except FileNotFoundError:
            return None, label, "missing"
        except Exception:  # PIL raises many types (OSError, SyntaxError, struct.error...) on damaged files
            return None, label, "corrupt"
        return torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1)).permute(2, 0, 1).contiguous(), label, ""

    def load(self, i: int) -> tuple[torch.Tensor | None, int]:
        image, label, _ = self.read(i)
        return image, label


class FolderDataset(ImageDataset):
    """The file list is held as one fixed-width bytes array of class/file paths and one int32 array of
    labels (ImageNet's 1.28M files: about 50 MB, no Python object per file), which forked loader
    workers share without copying."""
    channels = 3

    def __init__(self, root: Path, split: str):
        self.class_names = _class_folders(root / "train")
        self.root = root / split
        unknown = sorted(set(_class_folders(self.root)) - set(self.class_names))
        if unknown:
            raise ValueError(f"{self.root}: class folder(s) {', '.join(unknown[:5])} not in {root / 'train'}")
        paths, labels = [], []
        for label, name in enumerate(self.class_names):
            if (self.root / name).is_dir():
                with os.scandir(self.root / name) as entries:
                    files = sorted(e.name for e in entries
                                   if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file())
                paths += [os.fsencode(f"{name}/{f}") for f in files]
                labels += [label] * len(files)
        self.paths = np.array(paths, dtype=np.bytes_)
        self.labels = np.array(labels, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> Path:
        return self.root / os.fsdecode(self.paths[i])

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def open(self, i: int) -> Image.Image:
        return Image.open(self.path(i))


def _class_folders(path: Path) -> list[str]:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such split directory")
    names = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not names:
        raise ValueError(f"{path}: no class folders")
    return names



class IdxDataset(ImageDataset):
    """Fashion-MNIST's idx files, held in memory (47 MB for the full training split)."""
    channels = 1
    class_names = FASHION_MNIST_CLASSES

    def __init__(self, root: Path, split: str):
        prefix = IDX_PREFIX[split]
        self.images = read_idx(find_idx_file(root, f"{prefix}-images-idx3-ubyte"), ndim=3)
        self.labels = read_idx(find_idx_file(root, f"{prefix}-labels-idx1-ubyte"), ndim=1)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{root}: {len(self.images)} {prefix} images but {len(self.labels)} labels")
        if len(self.labels) and self.labels.max() >= len(self.class_names):
            raise ValueError(f"{root}: {prefix} label {self.labels.max()} is not a Fashion-MNIST class (0..9)")

    def __len__(self) -> int:
        return len(self.labels)

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def open(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])


class Subset(ImageDataset):
    def __init__(self, base: ImageDataset, indices):
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(self.indices) and not (0 <= self.indices.min() and self.indices.max() < len(base)):
            raise ValueError(f"subset indices must lie in [0, {len(base)})")
        self.class_names, self.channels = base.class_names, base.channels

    def __len__(self) -> int:
        return len(self.indices)

    def label(self, i: int) -> int:
        return self.base.label(int(self.indices[i]))

    def open(self, i: int) -> Image.Image:
        return self.base.open(int(self.indices[i]))


def subset(dataset: ImageDataset, indices) -> ImageDataset:
    """A view of dataset[indices] (no image is read)."""
    return Subset(dataset, indices)


def holdout_split(dataset: ImageDataset, n_holdout: int, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """(train, holdout) views: a seeded random n_holdout images of a training split are held out, so that
    hyperparameters are chosen on them rather than on the reported test set. Both keep dataset order."""
    if not 0 <= n_holdout < len(dataset):
        raise ValueError(f"n_holdout must be in [0, {len(dataset)}), got {n_holdout}")
    order = np.random.default_rng([seed, _HOLDOUT]).permutation(len(dataset))
    return subset(dataset, np.sort(order[n_holdout:])), subset(dataset, np.sort(order[:n_holdout]))


def open_image_dataset(source: str, split: str) -> ImageDataset:
    """Class folders if source holds train/, Fashion-MNIST idx files if it holds train-images-idx3-ubyte[.gz]."""
    root = Path(source)
    if split not in IDX_PREFIX:
        raise ValueError(f"split must be one of {', '.join(IDX_PREFIX)}, got {split!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such image data directory")
    if (root / "train").is_dir():
        return FolderDataset(root, split)
    if any((root / f"train-images-idx3-ubyte{ext}").is_file() for ext in ("", ".gz")):
        return IdxDataset(root, split)
    raise ValueError(f"{root}: neither class folders (train/<class>/*.jpg) nor idx files (train-images-idx3-ubyte.gz)")


# --- augmentation ----------------------------------------------------------------------------------

@dataclasses.dataclass
class AugmentConfig:
    """DeiT's recipe by default. For Fashion-MNIST use e.g. image_size=28, crop_scale=(0.35, 1.0).

    Per image (loader workers, uint8): random-resized crop to image_size (area fraction crop_scale,
    aspect ratio 3/4..4/3, bicubic), horizontal flip with prob hflip, then AutoAugment's ImageNet policy
    (auto_augment "original") or RandAugment of randaugment_n ops (0: off) at magnitude randaugment_m on
    the 0-10 scale, jittered by N(0, randaugment_mstd^2) (DeiT's rand-m9-mstd0.5-inc1).
    Eval: resize the shorter side to image_size / crop_pct, centre crop image_size (skipped for images
    already image_size square). mean/std None: ImageNet's for RGB, Fashion-MNIST's for one channel.
    Per micro-batch (training device, train only): normalise, random erasing of a box of each image with
    prob erase_prob (filled with N(0, 1) noise, as DeiT), then cutmix (lambda ~ Beta(cutmix_alpha)) with
    prob mix_switch_prob or else mixup (lambda ~ Beta(mixup_alpha)), one lambda per micro-batch, each image
    mixed with the one mirrored across the batch; alpha 0 turns either off. Targets are smoothed by
    label_smoothing (the usual 0.1 of DeiT's loss, applied here so the loss is plain soft cross-entropy).
    """
    image_size: int = 224
    train: bool = True
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    auto_augment: str = ""
    randaugment_n: int = 2
    randaugment_m: float = 9
    randaugment_mstd: float = 0.5
    crop_pct: float = 0.875
    erase_prob: float = 0.25
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_switch_prob: float = 0.5
    label_smoothing: float = 0.1


def normalization(cfg: AugmentConfig, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if cfg.mean is not None:
        return cfg.mean, cfg.std
    return (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (FASHION_MNIST_MEAN, FASHION_MNIST_STD)


class SampleTransform:
    """One image, opened lazily, -> uint8 (S, S, C) pixels: a random view (train) or the centre view
    (eval). Every random choice comes from the numpy Generator passed to sample()."""

    def __init__(self, cfg: AugmentConfig, channels: int):
        if cfg.auto_augment not in ("", "none", "original"):
            raise ValueError(f"auto_augment {cfg.auto_augment!r} is unknown (original, or empty for none)")
        if cfg.randaugment_n and not 0 <= cfg.randaugment_m <= 10:
            raise ValueError(f"randaugment_m is on a 0..10 scale; got {cfg.randaugment_m}")
        self.cfg, self.size, self.channels = cfg, cfg.image_size, channels
        self.mode = "RGB" if channels == 3 else "L"
        mean = normalization(cfg, channels)[0]
        fill = tuple(round(255 * m) for m in mean)  # the colour normalisation turns into 0
        self.fill = fill if channels == 3 else fill[0]

    def sample(self, dataset: ImageDataset, i: int, rng: np.random.Generator) -> tuple[np.ndarray | None, int, str]:
        """(pixels, label, "") or (None, label, why) for an image that is missing or does not decode."""
        label = dataset.label(i)
        try:
            with dataset.open(i) as lazy:
                box = self.box(*lazy.size, rng)
                image, box = image_augment.decode(lazy, box, self.size, self.mode, draft=self.cfg.train)
        except FileNotFoundError:
            return None, label, "missing"
        except Exception:  # PIL raises many types (OSError, SyntaxError, struct.error...) on damaged files
            return None, label, "corrupt"
        return self.finish(image, box, rng), label, ""

    def box(self, width: int, height: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
        if self.cfg.train:
            return image_augment.random_resized_crop_box(width, height, self.cfg.crop_scale, self.cfg.crop_ratio, rng)
        if (width, height) == (self.size, self.size):
            return 0, 0, width, height
        return image_augment.center_crop_box(width, height, self.size, self.cfg.crop_pct)

    def finish(self, image: Image.Image, box, rng: np.random.Generator) -> np.ndarray:
        if tuple(box) != (0, 0, self.size, self.size) or image.size != (self.size, self.size):
            image = image_augment.resize_box(image, box, self.size)
        cfg = self.cfg
        if cfg.train:
            if rng.random() < cfg.hflip:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if cfg.auto_augment == "original":
                image = image_augment.auto_augment(image, rng, self.fill)
            elif cfg.randaugment_n > 0:
                image = image_augment.rand_augment(image, rng, self.fill, cfg.randaugment_n, cfg.randaugment_m,
                                                   cfg.randaugment_mstd)
        return np.asarray(image).reshape(self.size, self.size, self.channels)


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B,) int labels -> (B, num_classes) float32 rows summing to 1, smoothed as timm does."""
    off = smoothing / num_classes
    targets = torch.full((len(labels), num_classes), off, dtype=torch.float32, device=labels.device)
    return targets.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


@dataclasses.dataclass
class MixPlan:
    """A training micro-batch's labels and the random choices of its erasing and mixing, drawn in the
    training process (BatchAugment.plan) and applied on the training device (BatchAugment.__call__)."""
    labels: torch.Tensor  # int64 (b,)
    erase: torch.Tensor  # int64 (b, 4): top, left, height, width of each image's erased box (height 0: none)
    noise_seed: int  # of the erased boxes' N(0, 1) fill
    mix: str = ""  # "", "mixup" or "cutmix"
    lam: float = 1.0  # each image's own share of the mix (cutmix: 1 - the pasted box's area fraction)
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # cutmix: top, left, height, width

    def __len__(self) -> int:
        return len(self.labels)


class BatchAugment:
    """On the training device: uint8 (b, S, S, C) -> normalised float32 (b, C, S, S), then random erasing
    and mixup or cutmix as the micro-batch's MixPlan says; returns (images, soft targets)."""

    def __init__(self, cfg: AugmentConfig, num_classes: int, channels: int):
        self.cfg, self.num_classes = cfg, num_classes
        mean, std = normalization(cfg, channels)
        self.mean, self.std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        self.on_device: dict = {}  # device -> (mean, std), copied there once

    def plan(self, labels: torch.Tensor, keys: tuple[int, ...]) -> MixPlan:
        """Draws a micro-batch's erasing and mixing from its seed keys (numpy, in this process)."""
        cfg, rng, size, b = self.cfg, np.random.default_rng([*keys, _BATCH]), self.cfg.image_size, len(labels)
        erase = torch.zeros(b, 4, dtype=torch.int64)
        if cfg.train and cfg.erase_prob > 0:
            erase = torch.from_numpy(erase_boxes(rng, b, size, cfg.erase_prob))
        plan = MixPlan(labels, erase, int(rng.integers(2 ** 62)))
        if not cfg.train or b == 0:
            return plan
        if cfg.cutmix_alpha > 0 and (cfg.mixup_alpha <= 0 or rng.random() < cfg.mix_switch_prob):
            plan.mix, plan.box = "cutmix", cutmix_box(rng, size, rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha))
            plan.lam = 1.0 - plan.box[2] * plan.box[3] / size ** 2
        elif cfg.mixup_alpha > 0:
            plan.mix, plan.lam = "mixup", float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
        return plan

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (b, S, S, C) -> float32 (b, C, S, S), normalised, on the images' device."""
        if images.device not in self.on_device:
            self.on_device[images.device] = (self.mean.to(images.device), self.std.to(images.device))
        mean, std = self.on_device[images.device]
        return ((images.permute(0, 3, 1, 2).float() / 255 - mean) / std).contiguous()

    def __call__(self, images: torch.Tensor, plan: MixPlan) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalize(images)
        labels = plan.labels.to(x.device, non_blocking=True)
        targets = soft_targets(labels, self.num_classes, self.cfg.label_smoothing)
        if len(plan) == 0:
            return x, targets
        if plan.erase[:, 2].numpy().any():  # the plan is on the host: no device read
            boxes = plan.erase.pin_memory() if x.is_cuda else plan.erase  # pinned: a copy that does not wait
            x = erase(x, boxes.to(x.device, non_blocking=True), plan.noise_seed)
        if plan.mix == "mixup":
            x = plan.lam * x + (1 - plan.lam) * x.flip(0)
        elif plan.mix == "cutmix":
            top, left, h, w = plan.box
            x = x.clone()
            x[:, :, top:top + h, left:left + w] = x.flip(0)[:, :, top:top + h, left:left + w]
        if plan.mix:
            targets = plan.lam * targets + (1 - plan.lam) * targets.flip(0)
        return x, targets


def erase_boxes(rng: np.random.Generator, b: int, size: int, prob: float, attempts: int = 10) -> np.ndarray:
    """(b, 4) boxes (top, left, height, width) for random erasing as DeiT's: with probability prob an
    image gets one box of area fraction ~ U(0.02, 1/3) and log aspect ratio ~ U(log 0.3, log 1/0.3),
    the first of `attempts` draws that fits; height 0 marks an image left alone."""
    area = rng.uniform(0.02, 1 / 3, (b, attempts)) * size * size
    aspect = np.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3), (b, attempts)))
    h, w = np.round(np.sqrt(area * aspect)).astype(np.int64), np.round(np.sqrt(area / aspect)).astype(np.int64)
    fits = (h < size) & (w < size)
    first = fits.argmax(axis=1)
    rows = np.arange(b)
    h, w = h[rows, first], w[rows, first]
    chosen = (rng.random(b) < prob) & fits.any(axis=1)
    top = (rng.random(b) * np.maximum(size - h + 1, 1)).astype(np.int64)
    left = (rng.random(b) * np.maximum(size - w + 1, 1)).astype(np.int64)
    return np.stack([top, left, np.where(chosen, h, 0), np.where(chosen, w, 0)], axis=1)


def erase(x: torch.Tensor, boxes: torch.Tensor, seed: int) -> torch.Tensor:
    """x with each image's box (top, left, height, width) filled with N(0, 1) noise drawn from a
    generator on x's device seeded by `seed` (so the same on any number of ranks)."""
    b, _, height, width = x.shape
    rows = torch.arange(height, device=x.device).view(1, 1, -1, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, 1, -1)
    top, left, h, w = (boxes[:, k].view(b, 1, 1, 1) for k in range(4))
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    noise = torch.randn(x.shape, generator=torch.Generator(x.device).manual_seed(seed), device=x.device, dtype=x.dtype)
    return torch.where(inside, noise, x)


def cutmix_box(rng: np.random.Generator, size: int, lam: float) -> tuple[int, int, int, int]:
    """(top, left, height, width): a box of side sqrt(1 - lam) * size around a uniform centre, clipped to the image."""
    side = int(size * math.sqrt(1 - lam))
    cy, cx = int(rng.integers(size)), int(rng.integers(size))
    top, bottom = max(cy - side // 2, 0), min(cy + side // 2, size)
    left, right = max(cx - side // 2, 0), min(cx + side // 2, size)
    return top, left, bottom - top, right - left


# --- decoding --------------------------------------------------------------------------------------

class _Samples(torch.utils.data.Dataset):
    """Sample keys (epoch, dataset index) -> (uint8 pixels or None, label, why dropped); the transform's
    random choices are seeded by (seed, epoch, index), whichever process runs it."""

    def __init__(self, dataset: ImageDataset, transform: SampleTransform, seed: int = 0):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __getitem__(self, key):
        epoch, i = key
        return self.transform.sample(self.dataset, i, np.random.default_rng([self.seed, epoch, i, _SAMPLE]))


def _collate(samples, shape) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    """(uint8 images (b, *shape), int64 labels (b,), [(position in the batch, reason)] of the dropped
    samples); b may be 0."""
    good = [(x, y) for x, y, _ in samples if x is not None]
    images = torch.empty((len(good), *shape), dtype=torch.uint8)
    pixels = images.numpy()
    for k, (x, _) in enumerate(good):
        pixels[k] = x
    labels = torch.tensor([y for _, y in good], dtype=torch.int64)
    return images, labels, [(k, why) for k, (x, _, why) in enumerate(samples) if x is None]


def _dataloader(samples: _Samples, batches, workers: int, pin_memory: bool, prefetch: int = 2):
    """A DataLoader over key lists; its own generator, since a DataLoader otherwise draws worker seeds
    (unused here) from the global RNG."""
    shape = (samples.transform.size, samples.transform.size, samples.transform.channels)
    return torch.utils.data.DataLoader(samples, batch_sampler=batches, num_workers=workers,
                                       collate_fn=functools.partial(_collate, shape=shape), pin_memory=pin_memory,
                                       prefetch_factor=prefetch if workers else None, generator=torch.Generator())


# --- loaders ---------------------------------------------------------------------------------------

ORDER = "numpy-permutation"  # saved with the loader state (data/cursor.py)


def cursor_at(n: int, global_batch: int, micro_batch: int, rank: int, world_size: int, seed: int,
              start: tuple[int, int, int] = (0, 0, 0)) -> GlobalBatchCursor:
    cursor = GlobalBatchCursor(n, global_batch, micro_batch, rank, world_size, seed, permutation_order(n, seed),
                               ORDER, unit="image")
    cursor.epoch, cursor.step, cursor.micro = start
    return cursor


class _StepKeys:
    """The sample keys (epoch, index) of one rank's micro-batches from (epoch, step, micro) on, forever:
    the loader's cursor walked ahead, for the DataLoader's workers. It holds the layout, not the loader,
    so that the DataLoader it feeds is freed with the loader."""

    def __init__(self, seed: int, n: int, global_batch: int, micro_batch: int, rank: int, world_size: int,
                 start: tuple[int, int, int]):
        self.layout, self.start = (n, global_batch, micro_batch, rank, world_size, seed), start

    def __iter__(self):
        cursor = cursor_at(*self.layout, self.start)
        while True:
            cursor.start_epoch_if_due()
            epoch = cursor.epoch
            yield [(epoch, int(i)) for i in cursor.next_ids()]


class ImageTrainLoader:
    """This rank's training micro-batches, forever: next(loader) -> (uint8 images (b, S, S, C), MixPlan);
    loader.batch_augment(images on the training device, plan) -> (float32 images (b, C, S, S), soft
    targets (b, num_classes)). b < micro_batch when images were dropped (see skipped). `workers` decoding
    processes run ahead by `prefetch` micro-batches each; `pin_memory` for a CUDA destination."""

    def __init__(self, dataset: ImageDataset, augment: AugmentConfig, global_batch: int, micro_batch: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, workers: int = 0, num_classes: int | None = None,
                 pin_memory: bool = False, prefetch: int = 2):
        self.cursor = cursor_at(len(dataset), global_batch, micro_batch, rank, world_size, seed)
        self.dataset, self.global_batch, self.seed, self.workers = dataset, global_batch, seed, workers
        self.pin_memory, self.prefetch = pin_memory, prefetch
        self.samples = _Samples(dataset, SampleTransform(augment, dataset.channels), seed)
        self.batch_augment = BatchAugment(augment, num_classes or dataset.num_classes, dataset.channels)
        self.skipped, self.skipped_by_reason = 0, collections.Counter()  # since this process started
        self.unreadable: set[int] = set()  # the dataset indices found unreadable (the same every epoch)
        self._batches = None  # the run's one DataLoader iterator, started at the first batch

    @property
    def steps_per_epoch(self) -> int:
        return self.cursor.steps_per_epoch

    @property
    def samples_per_epoch(self) -> int:
        return self.cursor.samples_per_epoch

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, MixPlan]:
        c = self.cursor
        c.start_epoch_if_due()
        if self._batches is None:
            keys = _StepKeys(self.seed, len(self.dataset), self.global_batch, c.micro_batch, c.rank, c.world_size,
                             (c.epoch, c.step, c.micro))
            self._batches = iter(_dataloader(self.samples, keys, self.workers, self.pin_memory, self.prefetch))
        images, labels, dropped = next(self._batches)
        epoch, step = c.epoch, c.step
        position = step * self.global_batch + c.rank * c.per_rank + c.micro * c.micro_batch  # the same on any world size
        indices = c.next_ids()
        self.skipped += len(dropped)
        self.skipped_by_reason.update(why for _, why in dropped)
        self.unreadable.update(int(indices[k]) for k, _ in dropped)
        return images, self.batch_augment.plan(labels, (self.seed, epoch, step, position))

    def state_dict(self) -> dict:
        return self.cursor.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """A state saved mid-step needs the same world_size and micro_batch; one at a step boundary does not."""
        self.cursor.load_state_dict(state)
        self._batches = None


class ValidationLoader:
    """This rank's share of the first `limit` images of a split (0: all) with the eval transform,
    streamed: iter -> (uint8 images (b, S, S, C), int64 labels (b,)). Each rank takes a contiguous
    share; every rank yields the same number of batches (the short ones end with empty batches), so
    sharded engines' collectives line up. `skipped`: the images of the last pass that did not decode."""

    def __init__(self, dataset: ImageDataset, augment: AugmentConfig, micro_batch: int, rank: int = 0,
                 world_size: int = 1, limit: int = 0, workers: int = 0, pin_memory: bool = False):
        n = min(limit, len(dataset)) if limit else len(dataset)
        share = -(-n // world_size)
        lo, hi = min(rank * share, n), min((rank + 1) * share, n)
        self.batches = [[(0, i) for i in range(s, min(s + micro_batch, hi))] for s in range(lo, hi, micro_batch)]
        self.length = -(-share // micro_batch)
        self.samples = _Samples(dataset, SampleTransform(dataclasses.replace(augment, train=False), dataset.channels))
        self.workers, self.pin_memory, self.skipped = workers, pin_memory, 0

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        self.skipped = 0
        loader = _dataloader(self.samples, self.batches, min(self.workers, len(self.batches)), self.pin_memory)
        for images, labels, dropped in (loader if self.batches else ()):
            self.skipped += len(dropped)
            yield images, labels
        for _ in range(self.length - len(self.batches)):
            yield self.empty()

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        size, channels = self.samples.transform.size, self.samples.transform.channels
        return torch.empty(0, size, size, channels, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)

    def first(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first batch, decoded in this process (an empty one on a rank without images)."""
        if not self.batches:
            return self.empty()
        images, labels, _ = _collate([self.samples[key] for key in self.batches[0]],
                                     (self.samples.transform.size, self.samples.transform.size,
                                      self.samples.transform.channels))
        return images, labels


def validation_batches(dataset: ImageDataset, augment: AugmentConfig, micro_batch: int, rank: int = 0,
                       world_size: int = 1, limit: int = 0, workers: int = 0):
    """-> (batches, skipped): ValidationLoader's batches as a list, and how many of its images were
    dropped as unreadable."""
    loader = ValidationLoader(dataset, augment, micro_batch, rank, world_size, limit, workers)
    batches = list(loader)
    return batches, loader.skipped
