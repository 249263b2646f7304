"""Image classification data for the ViT runs: ImageNet-style class folders or Fashion-MNIST idx files,
DeiT's augmentation (from kornia), and a train loader whose resume is exact.

Layouts (open_image_dataset picks one from what the directory holds):
- class folders: root/{train,val}/<class>/<image>; the classes are train's sorted folder names.
- idx files: root/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (Fashion-MNIST); val/test = t10k.

As in data.py, the order of an epoch is a permutation seeded by (seed, epoch); optimizer step s uses
positions [s*G, (s+1)*G) of it and rank r takes the r-th contiguous slice of G / world_size, in
micro-batches, so a step's samples do not depend on the number of ranks. The random crop, flip and
RandAugment of sample i are seeded by (seed, epoch, i) in whichever process decodes it, and erasing
and mixup/cutmix of a micro-batch by (seed, epoch, step, its position in the epoch). Images of one
fixed shape (Fashion-MNIST) are cropped and flipped a micro-batch at a time, seeded by its position,
which is some 20x faster on 28 x 28 images than image by image. The loader's state is therefore just
(epoch, step, micro) and resume is bitwise exact, also onto another number of ranks at a step boundary
(for fixed-shape images: with the same micro_batch).

Training targets come back as soft (B, num_classes) distributions (label smoothing and mixup/cutmix
applied), so the loss is -(targets * log_softmax(logits)).sum(-1).mean(); validation labels are int64.
An image that is missing or does not decode is dropped from its batch and counted, never replaced.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import gzip
import math
import random
import struct
import zlib
from pathlib import Path

import kornia.augmentation as K
import numpy as np
import torch
from kornia.augmentation.auto.rand_augment.rand_augment import RandAugment, default_policy
from kornia.enhance import normalize
from PIL import Image

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IDX_PREFIX = {"train": "train", "val": "t10k", "test": "t10k"}
_SAMPLE, _BATCH, _HOLDOUT = 0, 1, 2  # seed-stream tags


# --- datasets --------------------------------------------------------------------------------------

class ImageDataset:
    """Labelled images read one at a time; subclasses set class_names and channels and define read().
    `fixed_shape` (C, H, W) when every image has that shape: the train loader then crops and flips
    whole micro-batches at once instead of image by image (the same augmentation, far less overhead)."""
    class_names: list[str]
    channels: int
    fixed_shape: tuple[int, int, int] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def read(self, i: int) -> tuple[torch.Tensor | None, int, str]:
        """(uint8 C x H x W image, label, "") or (None, label, why: "missing" or "corrupt")."""
        raise NotImplementedError

    def load(self, i: int) -> tuple[torch.Tensor | None, int]:
        image, label, _ = self.read(i)
        return image, label


class FolderDataset(ImageDataset):
    channels = 3

    def __init__(self, root: Path, split: str):
        self.class_names = _class_folders(root / "train")
        split_dir = root / split
        unknown = sorted(set(_class_folders(split_dir)) - set(self.class_names))
        if unknown:
            raise ValueError(f"{split_dir}: class folder(s) {', '.join(unknown[:5])} not in {root / 'train'}")
        self.files, self.labels = [], []
        for label, name in enumerate(self.class_names):
            if (split_dir / name).is_dir():
                files = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
                self.files += files
                self.labels += [label] * len(files)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i):
        label = self.labels[i]
        try:
            with Image.open(self.files[i]) as im:
                rgb = np.array(im.convert("RGB"))
        except FileNotFoundError:
            return None, label, "missing"
        except Exception:  # PIL raises many types (OSError, SyntaxError, struct.error...) on damaged files
            return None, label, "corrupt"
        return torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), label, ""


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
        self.fixed_shape = (1, *self.images.shape[1:])

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i):
        return torch.from_numpy(self.images[i][None].copy()), int(self.labels[i]), ""


def find_idx_file(root, name: str) -> Path:
    """root/name or root/name.gz."""
    for path in (Path(root) / name, Path(root) / f"{name}.gz"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{root}: no {name} or {name}.gz")


def read_idx(path, ndim: int | None = None) -> np.ndarray:
    """A uint8 idx file (LeCun's MNIST format, gzipped or not) as a read-only array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        raw = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a readable idx file ({e})") from None
    if len(raw) < 4 or raw[:3] != b"\0\0\x08" or (ndim is not None and raw[3] != ndim):
        raise ValueError(f"{path}: not a uint8 idx file of {ndim or 'any'} dims (magic {raw[:4].hex() or 'empty'})")
    header = 4 + 4 * raw[3]
    if len(raw) < header:
        raise ValueError(f"{path}: idx header cut short (truncated file)")
    shape = struct.unpack(f">{raw[3]}I", raw[4:header])
    if len(raw) - header != int(np.prod(shape)):
        raise ValueError(f"{path}: {len(raw) - header} data bytes for shape {shape} (truncated or corrupt file)")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


class Subset(ImageDataset):
    def __init__(self, base: ImageDataset, indices):
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(self.indices) and not (0 <= self.indices.min() and self.indices.max() < len(base)):
            raise ValueError(f"subset indices must lie in [0, {len(base)})")
        self.class_names, self.channels, self.fixed_shape = base.class_names, base.channels, base.fixed_shape

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, i):
        return self.base.read(int(self.indices[i]))


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

    Per image (loader workers): random-resized-crop to image_size (scale crop_scale, ratio 3/4..4/3,
    bicubic), horizontal flip with prob hflip, RandAugment of randaugment_n ops (0: off) at magnitude
    randaugment_m on timm's 0..10 scale (DeiT's rand-m9; kornia's scale is 0..30, so it gets 3*m), with
    kornia's ops and timm's shear/translate ranges (see _TIMM_RANGES).
    Eval: resize the shorter side to image_size / crop_pct, center crop image_size (skipped for images
    already image_size square). mean/std None: ImageNet's for RGB, Fashion-MNIST's for one channel.
    Per micro-batch (main process, train only): random erasing with prob erase_prob (value 0, i.e. the
    mean colour after normalisation), then cutmix (Beta(cutmix_alpha)) with prob mix_switch_prob or else
    mixup (lambda ~ Beta(mixup_alpha), one per batch); alpha 0 turns either off. Targets are smoothed by
    label_smoothing (the usual 0.1 of DeiT's loss, applied here so the loss is plain soft cross-entropy).
    """
    image_size: int = 224
    train: bool = True
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    randaugment_n: int = 2
    randaugment_m: int = 9
    crop_pct: float = 0.875
    erase_prob: float = 0.25
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_switch_prob: float = 0.5
    label_smoothing: float = 0.1


class SampleTransform:
    """uint8 C x H x W -> normalised float32 C x S x S: random (train) or resize + center crop (eval).
    Randomness comes from torch's global RNG; seed it around the call (see _seeded)."""

    def __init__(self, cfg: AugmentConfig, channels: int):
        self.cfg, size = cfg, cfg.image_size
        mean, std = (cfg.mean, cfg.std) if cfg.mean is not None else \
            ((IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (FASHION_MNIST_MEAN, FASHION_MNIST_STD))
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)
        if cfg.train:
            self.crop_flip = K.AugmentationSequential(
                K.RandomResizedCrop((size, size), scale=cfg.crop_scale, resample="bicubic"),
                K.RandomHorizontalFlip(p=cfg.hflip))
            self.randaugment = _randaugment(cfg, channels) if cfg.randaugment_n > 0 else None
        else:
            self.resize_crop = K.AugmentationSequential(
                K.Resize(int(size / cfg.crop_pct), side="short", resample="bicubic", antialias=True),
                K.CenterCrop(size))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.batch(image.unsqueeze(0))[0]

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (b, C, H, W) of one shape -> (b, C, S, S); crop and flip draw per-image parameters."""
        x = images.float() / 255
        if len(x) == 0:
            return x.new_empty(0, x.shape[1], self.cfg.image_size, self.cfg.image_size)
        if self.cfg.train:
            x = self.crop_flip(x).clamp(0, 1)  # bicubic overshoots; RandAugment's ops expect [0, 1]
            if self.randaugment is not None:  # its ops are drawn per call: one call per image
                x = torch.cat([self.randaugment(image[None]) for image in x])
        elif x.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            x = self.resize_crop(x).clamp(0, 1)
        return normalize(x, self.mean, self.std)


# timm's (DeiT's) ranges where kornia's default policy differs in kind: kornia reads a shear magnitude
# as degrees / 180 (0.3 -> 54 degrees) where timm means the shear factor (0.3 -> 16.7 degrees), and
# kornia translates by at most 10% of the side where timm goes to 45%.
_TIMM_RANGES = {"shear_x": math.degrees(math.atan(0.3)) / 180, "shear_y": math.degrees(math.atan(0.3)) / 180,
                "translate_x": 0.45, "translate_y": 0.45}


def _randaugment(cfg: AugmentConfig, channels: int) -> RandAugment:
    if not 0 < cfg.randaugment_m < 10:
        raise ValueError(f"randaugment_m is on timm's scale, 1..9; got {cfg.randaugment_m}")
    policy = [[(name, -_TIMM_RANGES[name], _TIMM_RANGES[name]) if name in _TIMM_RANGES else (name, low, high)]
              for [(name, low, high)] in default_policy
              if channels == 3 or name != "color"]  # saturation needs RGB, and would not change grey anyway
    return RandAugment(n=cfg.randaugment_n, m=3 * cfg.randaugment_m, policy=policy)


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B,) int labels -> (B, num_classes) float32 rows summing to 1, smoothed as timm does."""
    off = smoothing / num_classes
    targets = torch.full((len(labels), num_classes), off, dtype=torch.float32)
    return targets.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


class BatchAugment:
    """Random erasing then cutmix or mixup on a collated micro-batch; returns (images, soft targets)."""

    def __init__(self, cfg: AugmentConfig, num_classes: int):
        self.cfg, self.num_classes = cfg, num_classes
        on = cfg.train
        self.erase = K.RandomErasing(p=cfg.erase_prob, value=0.0) if on and cfg.erase_prob > 0 else None
        self.cutmix = K.RandomCutMixV2(beta=cfg.cutmix_alpha, data_keys=["input", "class"],
                                       use_correct_lambda=True) if on and cfg.cutmix_alpha > 0 else None
        self.mixup_alpha = cfg.mixup_alpha if on else 0.0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = soft_targets(labels, self.num_classes, self.cfg.label_smoothing)
        if len(images) == 0:
            return images, targets
        if self.erase is not None:
            images = self.erase(images)
        if self.cutmix is not None and (self.mixup_alpha == 0 or torch.rand(()) < self.cfg.mix_switch_prob):
            images, (mix,) = self.cutmix(images, labels)
            keep = mix[:, 2]  # kornia's cutmix lambda is the weight of the original label...
        elif self.mixup_alpha > 0:
            lam = float(torch.distributions.Beta(self.mixup_alpha, self.mixup_alpha).sample())
            images, mix = K.RandomMixUpV2(lambda_val=(lam, lam), data_keys=["input", "class"])(images, labels)
            keep = 1 - mix[:, 2]  # ...its mixup lambda that of the partner's
        else:
            return images, targets
        partner = soft_targets(mix[:, 1].long(), self.num_classes, self.cfg.label_smoothing)
        return images, keep[:, None] * targets + (1 - keep[:, None]) * partner


@contextlib.contextmanager
def _seeded(*keys: int):
    """Seeds torch's CPU generator, random and numpy from keys for the block, then restores all three:
    kornia draws from torch's global RNG, and the training process's own streams must not move."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


# --- decoding --------------------------------------------------------------------------------------

class _Decode(torch.utils.data.Dataset):
    """Reads and transforms one sample, the transform seeded by (seed, epoch, index); with no
    transform, returns the decoded uint8 image (the loader transforms the whole batch)."""

    def __init__(self, dataset: ImageDataset, transform: SampleTransform | None, seed: int = 0, epoch: int = 0,
                 shape: tuple[int, int, int] | None = None):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, epoch
        size = transform.cfg.image_size if transform is not None else 0
        self.shape = shape or (dataset.channels, size, size)

    def __getitem__(self, i: int):
        image, label, why = self.dataset.read(i)
        if image is None:
            return None, label, why
        if self.transform is None:
            return image, label, ""
        with _seeded(self.seed, self.epoch, i, _SAMPLE):
            return self.transform(image), label, ""


def _collate(samples, shape):
    """(images (b, *shape), int64 labels (b,), [(position in the batch, reason)] of the dropped samples);
    b may be 0."""
    good = [(x, y) for x, y, _ in samples if x is not None]
    images = torch.stack([x for x, _ in good]) if good else torch.empty(0, *shape)
    labels = torch.tensor([y for _, y in good], dtype=torch.int64)
    return images, labels, [(k, why) for k, (x, _, why) in enumerate(samples) if x is None]


def _decode_batches(decode: _Decode, batches: list[list[int]], workers: int):
    if not batches:
        return iter(())
    collate = functools.partial(_collate, shape=decode.shape)
    # its own generator: a DataLoader draws worker seeds (unused here) from the global RNG otherwise
    return iter(torch.utils.data.DataLoader(decode, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                                            generator=torch.Generator()))


# --- loaders ---------------------------------------------------------------------------------------

class ImageTrainLoader:
    """This rank's training micro-batches, forever: next(loader) -> (images (b, C, S, S) float32,
    soft targets (b, num_classes) float32). b < micro_batch when images were dropped (see skipped)."""

    def __init__(self, dataset: ImageDataset, augment: AugmentConfig, global_batch: int, micro_batch: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, workers: int = 0, num_classes: int | None = None):
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"global_batch {global_batch} is not a multiple of micro_batch {micro_batch} "
                             f"x world_size {world_size}")
        if len(dataset) < global_batch:
            raise ValueError(f"{len(dataset)} images are fewer than one global batch of {global_batch}")
        self.dataset, self.global_batch, self.micro_batch = dataset, global_batch, micro_batch
        self.rank, self.world_size, self.seed, self.workers = rank, world_size, seed, workers
        self.micro_per_step = global_batch // (micro_batch * world_size)
        self.transform = SampleTransform(augment, dataset.channels)
        self.batch_augment = BatchAugment(augment, num_classes or dataset.num_classes)
        self.epoch = self.step = self.micro = 0
        self.skipped, self.skipped_by_reason = 0, collections.Counter()  # since this process started
        self.unreadable: set[int] = set()  # the dataset indices found unreadable (the same every epoch)
        self._batches = None  # iterator over this rank's rest of the epoch, built lazily
        self._indices = collections.deque()  # the dataset indices of each micro-batch still to come

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch

    @property
    def samples_per_epoch(self) -> int:
        return self.steps_per_epoch * self.global_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def step_indices(self, step: int, epoch: int | None = None, order: np.ndarray | None = None) -> np.ndarray:
        """This rank's dataset indices at an optimizer step (default: of the current epoch), in micro-batch order."""
        order = self.epoch_order(self.epoch if epoch is None else epoch) if order is None else order
        per_rank = self.global_batch // self.world_size
        start = step * self.global_batch + self.rank * per_rank
        return order[start:start + per_rank]

    def _start_epoch(self) -> None:
        order, mb = self.epoch_order(self.epoch), self.micro_batch
        batches = []
        for step in range(self.step, self.steps_per_epoch):
            indices = self.step_indices(step, order=order).tolist()
            first = self.micro if step == self.step else 0
            batches += [indices[m * mb:(m + 1) * mb] for m in range(first, self.micro_per_step)]
        if self.dataset.fixed_shape is not None:  # decode only; crop and flip the batch in __next__
            decode = _Decode(self.dataset, None, self.seed, self.epoch, shape=self.dataset.fixed_shape)
        else:
            decode = _Decode(self.dataset, self.transform, self.seed, self.epoch)
        self._batches = _decode_batches(decode, batches, self.workers)
        self._indices = collections.deque(batches)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None:
            self._start_epoch()
        images, labels, dropped = next(self._batches)
        indices = self._indices.popleft()
        self.skipped += len(dropped)
        self.skipped_by_reason.update(why for _, why in dropped)
        self.unreadable.update(indices[k] for k, _ in dropped)
        position = (self.step * self.global_batch + self.rank * (self.global_batch // self.world_size)
                    + self.micro * self.micro_batch)  # of the micro-batch in the epoch: the same on any world size
        if self.dataset.fixed_shape is not None:
            with _seeded(self.seed, self.epoch, self.step, position, _SAMPLE):
                images = self.transform.batch(images)
        with _seeded(self.seed, self.epoch, self.step, position, _BATCH):
            images, targets = self.batch_augment(images, labels)
        self._advance()
        return images, targets

    def _advance(self) -> None:
        self.micro += 1
        if self.micro == self.micro_per_step:
            self.step, self.micro = self.step + 1, 0
        if self.step == self.steps_per_epoch:
            self.epoch, self.step, self._batches = self.epoch + 1, 0, None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "micro": self.micro}

    def load_state_dict(self, state: dict) -> None:
        """A state saved mid-step needs the same world_size and micro_batch; one at a step boundary does not."""
        epoch, step, micro = int(state["epoch"]), int(state["step"]), int(state["micro"])
        if not (epoch >= 0 and 0 <= step < self.steps_per_epoch and 0 <= micro < self.micro_per_step):
            raise ValueError(f"loader state {state} does not fit {self.steps_per_epoch} steps of "
                             f"{self.micro_per_step} micro-batches")
        self.epoch, self.step, self.micro, self._batches = epoch, step, micro, None


def validation_batches(dataset: ImageDataset, augment: AugmentConfig, micro_batch: int, rank: int = 0,
                       world_size: int = 1, limit: int = 0, workers: int = 0):
    """-> (batches, skipped): this rank's [(images (b, C, S, S), labels int64 (b,))] of the first `limit`
    images (0: all) with the eval transform, and how many of its images were dropped as unreadable.
    Each rank takes a contiguous share; all ranks return the same number of batches (the short ones end
    with empty batches), so sharded engines' collectives line up. The batches are held in memory."""
    n = min(limit, len(dataset)) if limit else len(dataset)
    share = -(-n // world_size)
    lo, hi = min(rank * share, n), min((rank + 1) * share, n)
    decode = _Decode(dataset, SampleTransform(dataclasses.replace(augment, train=False), dataset.channels))
    batches, skipped = [], 0
    for images, labels, dropped in _decode_batches(decode, [list(range(s, min(s + micro_batch, hi)))
                                                            for s in range(lo, hi, micro_batch)], workers):
        batches.append((images, labels))
        skipped += len(dropped)
    size = augment.image_size
    empty = (torch.empty(0, dataset.channels, size, size), torch.empty(0, dtype=torch.int64))
    return batches + [empty] * (-(-share // micro_batch) - len(batches)), skipped
