"""Image classification (the ViT family):

    python -m megatron_lax.train --config configs/vit_fashion_mnist.yaml [--section.key value ...]

The schedule is counted in epochs of the training images (train.epochs, optim.warmup_epochs); validation reports top-1 and top-5
accuracy and the cross-entropy. With data.holdout > 0 a seeded slice of the training images is never
trained on, and data.eval_split holdout scores it instead of the reported split: choosing a learning
rate there keeps the reported test images out of every choice.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..config import Config, DataConfig
from ..data import images
from ..method.init import init_weights
from ..models import family_of
from ..parallel import ModelRecipe
from ..parallel.distributed import DistInfo, all_gather_object, all_reduce_sum
from .base import Task

HOLDOUT_SEED = 1234  # the held-out slice is the same whatever data.seed, so every run is scored on it


def open_splits(d: DataConfig) -> tuple[images.ImageDataset, images.ImageDataset]:
    """(training images, validation images) as data.train_images / holdout / eval_split ask."""
    train = images.open_image_dataset(d.path, "train")
    if d.train_images:
        train = images.subset(train, range(min(d.train_images, len(train))))
    holdout = None
    if d.holdout:
        if d.holdout >= len(train):
            raise ValueError(f"data.holdout {d.holdout} leaves no training images (there are {len(train)})")
        train, holdout = images.holdout_split(train, d.holdout, HOLDOUT_SEED)
    evaluated = holdout if d.eval_split == "holdout" else images.open_image_dataset(d.path, "val")
    return train, evaluated


def augment_config(cfg: Config, train: bool) -> images.AugmentConfig:
    a = cfg.augment
    return images.AugmentConfig(
        image_size=cfg.model.image_size, train=train, crop_scale=(a.crop_scale_min, 1.0), hflip=a.hflip,
        auto_augment="" if a.auto_augment == "none" else a.auto_augment, randaugment_n=a.randaugment_n,
        randaugment_m=a.randaugment_m, crop_pct=a.crop_pct, erase_prob=a.random_erasing, mixup_alpha=a.mixup,
        cutmix_alpha=a.cutmix, label_smoothing=a.label_smoothing)


def validation_loader(cfg: Config, dataset: images.ImageDataset, rank: int = 0, world_size: int = 1,
                      micro_batch: int = 0, limit: int | None = None, pin_memory: bool = False):
    return images.ValidationLoader(dataset, augment_config(cfg, train=False), micro_batch or cfg.train.micro_batch,
                                   rank, world_size, cfg.data.val_images if limit is None else limit,
                                   cfg.data.loader_workers, pin_memory)


PAD_LABEL = -100  # a padding row's label: nll_loss's ignore_index, never a top-k hit, not counted


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor):
    log_probs = torch.nn.functional.log_softmax(logits.float(), dim=-1)
    return torch.nn.functional.nll_loss(log_probs, labels, reduction="sum"), labels.numel()


def accuracy_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[summed cross-entropy, top-1 hits, top-5 hits, images] of one batch, in fp32; rows labelled
    PAD_LABEL count for nothing."""
    if labels.numel() == 0:
        return torch.zeros(4, device=logits.device)
    loss, _ = cross_entropy_sum(logits, labels)
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    hits = top == labels[:, None]
    return torch.stack([loss, hits[:, 0].sum().float(), hits.any(-1).sum().float(), (labels >= 0).sum().float()])


def padded(pixels: torch.Tensor, labels: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch filled up to `rows` rows with blank images labelled PAD_LABEL: a compiled model then
    sees one batch size, whatever the split's remainder (or a rank's empty batch)."""
    missing = rows - len(labels)
    if missing <= 0:
        return pixels, labels
    return (torch.cat([pixels, pixels.new_zeros((missing, *pixels.shape[1:]))]),
            torch.cat([labels, labels.new_full((missing,), PAD_LABEL)]))


def skipped_note(record: dict) -> str:
    if not record["skipped_images"]:
        return ""
    return (f"; {record['skipped_images']} unreadable images skipped ({record['skipped_train_images']} training, "
            f"{record['skipped_val_images']} validation)")


def accuracy_over(batches, forward, normalize, device: torch.device, rows: int = 0) -> torch.Tensor:
    """accuracy_sums over uint8 batches, each normalised on the device and passed through `forward`;
    `rows` > 0: each batch padded to that many rows first."""
    sums = torch.zeros(4, device=device)
    for pixels, labels in batches:
        if rows:
            pixels, labels = padded(pixels, labels, rows)
        sums += accuracy_sums(forward(normalize(pixels.to(device, non_blocking=True))),
                              labels.to(device, non_blocking=True))
    return sums


def summary_of(sums: torch.Tensor) -> dict:
    loss, top1, top5, n = (float(v) for v in sums)
    n = max(n, 1.0)
    return {"val_loss": loss / n, "val_acc1": 100 * top1 / n, "val_acc5": 100 * top5 / n, "val_images": int(n)}


class ImageClassification(Task):
    unit = "images"
    headline_metric = ("val_acc1", "top-1 (%)", True)
    metric_titles = {"val_acc1": ("top-1 accuracy (%)", True), "val_loss": ("val loss", False)}
    baseline_metric = ("chance_acc1", "Chance")

    def __init__(self, cfg: Config, dist: DistInfo):
        super().__init__(cfg, dist)
        cfg, t = self.cfg, self.cfg.train
        self.train_set, self.eval_set = open_splits(cfg.data)
        cfg.model.num_classes = cfg.model.num_classes or self.train_set.num_classes
        cfg.model.in_channels = cfg.model.in_channels or self.train_set.channels
        pin = dist.device.type == "cuda"
        self.loader = images.ImageTrainLoader(self.train_set, augment_config(cfg, train=True), t.global_batch,
                                              t.micro_batch, dist.rank, dist.world_size, cfg.data.seed,
                                              cfg.data.loader_workers, cfg.model.num_classes, pin)
        self.val_loader = validation_loader(cfg, self.eval_set, dist.rank, dist.world_size, pin_memory=pin)
        if self.loader.steps_per_epoch == 0:
            raise ValueError(f"{len(self.train_set)} training images do not fill one step of {t.global_batch}")
        self.n_params = family_of(cfg.model).count_parameters(cfg.model)
        self.total_steps = self.planned_steps(cfg, self.loader.steps_per_epoch)
        if self.total_steps <= 0:
            raise ValueError("a ViT run needs train.epochs (or train.steps) > 0")
        if cfg.optim.warmup_epochs >= 0:
            cfg.optim.warmup_steps = round(cfg.optim.warmup_epochs * self.loader.steps_per_epoch)
        self.val_skipped = 0

    def model(self) -> ModelRecipe:
        cfg = self.cfg
        return ModelRecipe(build=lambda: family_of(cfg.model).build(cfg.model, init_seed=None),
                           initialize=lambda model: init_weights(model, cfg.train.seed))

    def loss(self, outputs, targets):
        return family_of(self.cfg.model).loss(outputs, targets)

    def validation_batches(self) -> list:
        """The one validation batch the trainer keeps: the first, normalised, for the LaX statistics'
        forward. Validation itself streams the split (evaluate)."""
        pixels, labels = self.val_loader.first()
        return [(self.loader.batch_augment.normalize(pixels), labels)]

    def to_device(self, pixels: torch.Tensor, plan: images.MixPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 pixels to the device, then normalisation, erasing and mixing there."""
        return self.loader.batch_augment(pixels.to(self.dist.device, non_blocking=True), plan)

    def evaluate(self, engine, batches, seen: int = 0) -> dict:
        sums = accuracy_over(self.val_loader, engine.predict, self.loader.batch_augment.normalize,
                             self.dist.device, self.cfg.train.micro_batch)  # streamed: `batches` holds only the first
        self.val_skipped = self.val_loader.skipped
        return {**summary_of(all_reduce_sum(sums)), **self.unreadable(seen)}

    def unreadable(self, seen: int) -> dict:
        """Unreadable images skipped (all ranks): training ones since this process started, and the
        validation set's; and the epochs trained (`seen` images), counted in readable images (the
        training images less those found unreadable: all of them once an epoch has been read).
        Collective."""
        counts = all_reduce_sum(torch.tensor([float(self.loader.skipped), float(self.val_skipped)],
                                             device=self.dist.device))
        found = set().union(*all_gather_object(self.loader.unreadable))
        readable = self.loader.samples_per_epoch * (1 - len(found) / len(self.train_set))
        train, val = int(counts[0]), int(counts[1])
        return {"skipped_images": train + val, "skipped_train_images": train, "skipped_val_images": val,
                "epochs": seen / max(readable, 1.0)}

    def describe_validation(self, record: dict) -> str:
        return (f"val_loss {record['val_loss']:.4f}  top-1 {record['val_acc1']:.2f}%  top-5 {record['val_acc5']:.2f}%  "
                f"({record['val_images']} images){skipped_note(record)}")

    def summarize(self, final: dict, best_val_loss: float) -> tuple[dict, str]:
        fields = {k: final[k] for k in ("val_loss", "val_acc1", "val_acc5", "val_images", "skipped_images",
                                        "skipped_train_images", "skipped_val_images", "epochs")}
        split = "held-out training images" if self.cfg.data.eval_split == "holdout" else "validation images"
        return fields, (f"top-1 accuracy {final['val_acc1']:.2f}% (top-5 {final['val_acc5']:.2f}%, loss "
                        f"{final['val_loss']:.4f}) on {final['val_images']} {split}; {final['epochs']:.2f} epochs "
                        f"of the readable training images{skipped_note(final)}")

    def baselines(self) -> dict:
        return {"chance_acc1": 100.0 / self.cfg.model.num_classes}

    def describe(self, engine) -> str:
        cfg, t = self.cfg, self.cfg.train
        lax = f" + LaX ({cfg.model.lax_gate})" if cfg.model.uses_lax else ""
        intra = f", intra-layer LaX on {','.join(cfg.model.lax_intra_modules)}" if cfg.model.lax_intra_modules else ""
        epochs = self.total_steps / self.loader.steps_per_epoch
        return (f"model: ViT {cfg.model.method}{lax}{intra}, {self.n_params / 1e6:.2f}M parameters; "
                f"{self.total_steps} steps of {t.global_batch} images ({epochs:.2f} epochs of {len(self.train_set)}) "
                f"on {self.dist.world_size} rank(s), engine {cfg.parallel.engine}, precision {engine.precision}")

    def throughput_basis(self) -> tuple[float, float]:
        return self.cfg.train.global_batch, family_of(self.cfg.model).flops(self.cfg.model)["train"]

    @classmethod
    def evaluate_checkpoint(cls, model, cfg: Config, dist: DistInfo, data_path: str | None = None, count: int = 0,
                            micro_batch: int = 0) -> dict:
        """Top-1 / top-5 accuracy and loss on the run's validation split (one process); `count` is not
        used: the split is data.val_images long."""
        if dist.world_size > 1:
            raise ValueError("evaluating a ViT checkpoint runs on one process")
        if data_path:
            cfg.data.path = data_path
        return evaluate_model(model, cfg, dist.device, cfg.data.eval_split, cfg.data.val_images, micro_batch)

    @classmethod
    def describe_evaluation(cls, result: dict) -> str:
        return (f"top-1 accuracy {result['val_acc1']:.2f}% (top-5 {result['val_acc5']:.2f}%, loss "
                f"{result['val_loss']:.4f}) on {result['val_images']} images of the {result['split']} split "
                f"({result['skipped_images']} unreadable), {result['precision']}")

    @classmethod
    def planned_steps(cls, cfg: Config, steps_per_epoch: int = 0) -> int:
        """train.steps, or train.epochs of the training images in steps of train.global_batch."""
        if cfg.train.steps:
            return cfg.train.steps
        if not steps_per_epoch:
            steps_per_epoch = len(open_splits(cfg.data)[0]) // cfg.train.global_batch
        return math.ceil(cfg.train.epochs * steps_per_epoch)


@torch.no_grad()
def evaluate_model(model, cfg: Config, device: torch.device, split: str = "val", limit: int = 0,
                   micro_batch: int = 0) -> dict:
    """Accuracy of a built ViT on one split of the run's data, on one process."""
    _, dataset = open_splits(dataclasses.replace(cfg.data, eval_split=split))
    loader = validation_loader(cfg, dataset, micro_batch=micro_batch, limit=limit, pin_memory=device.type == "cuda")
    normalize = images.BatchAugment(augment_config(cfg, train=False), cfg.model.num_classes, dataset.channels).normalize
    sums = accuracy_over(loader, model, normalize, device)
    return {**summary_of(sums), "skipped_images": loader.skipped, "split": split}
