"""Image classification (model.arch vit): the pre-training loop of train.py with image data.

    python -m megatron_lax.train --config configs/vit_fashion_mnist.yaml [--section.key value ...]

`train` picks VisionTrainer for a ViT config; everything else (engines, precision, checkpoints with
exact resume, metrics, TensorBoard, sweep and reproduce) is pre-training's. The schedule is counted in
epochs of the training images (train.epochs, optim.warmup_epochs); validation reports top-1 and top-5
accuracy and the cross-entropy. With data.holdout > 0 a seeded slice of the training images is never
trained on, and data.eval_split holdout scores it instead of the reported split: choosing a learning
rate there keeps the reported test images out of every choice.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from . import vision_data
from .config import Config, DataConfig
from .models.vit import classification_loss, count_parameters, flops_per_image
from .parallel.distributed import all_reduce_sum
from .train import Trainer

HOLDOUT_SEED = 1234  # the held-out slice is the same whatever data.seed, so every run is scored on it


def open_splits(d: DataConfig) -> tuple[vision_data.ImageDataset, vision_data.ImageDataset]:
    """(training images, validation images) as data.train_images / holdout / eval_split ask."""
    train = vision_data.open_image_dataset(d.path, "train")
    if d.train_images:
        train = vision_data.subset(train, range(min(d.train_images, len(train))))
    holdout = None
    if d.holdout:
        if d.holdout >= len(train):
            raise ValueError(f"data.holdout {d.holdout} leaves no training images (there are {len(train)})")
        train, holdout = vision_data.holdout_split(train, d.holdout, HOLDOUT_SEED)
    evaluated = holdout if d.eval_split == "holdout" else vision_data.open_image_dataset(d.path, "val")
    return train, evaluated


def planned_steps(cfg: Config, steps_per_epoch: int = 0) -> int:
    """train.steps, or train.epochs of the training images in steps of train.global_batch."""
    if cfg.train.steps:
        return cfg.train.steps
    if not steps_per_epoch:
        steps_per_epoch = len(open_splits(cfg.data)[0]) // cfg.train.global_batch
    return math.ceil(cfg.train.epochs * steps_per_epoch)


def augment_config(cfg: Config, train: bool) -> vision_data.AugmentConfig:
    a = cfg.augment
    return vision_data.AugmentConfig(
        image_size=cfg.model.image_size, train=train, crop_scale=(a.crop_scale_min, 1.0), hflip=a.hflip,
        auto_augment="" if a.auto_augment == "none" else a.auto_augment, randaugment_n=a.randaugment_n,
        randaugment_m=a.randaugment_m, crop_pct=a.crop_pct, erase_prob=a.random_erasing, mixup_alpha=a.mixup,
        cutmix_alpha=a.cutmix, label_smoothing=a.label_smoothing)


def validation_loader(cfg: Config, dataset: vision_data.ImageDataset, rank: int = 0, world_size: int = 1,
                      micro_batch: int = 0, limit: int | None = None, pin_memory: bool = False):
    return vision_data.ValidationLoader(dataset, augment_config(cfg, train=False), micro_batch or cfg.train.micro_batch,
                                        rank, world_size, cfg.data.val_images if limit is None else limit,
                                        cfg.data.loader_workers, pin_memory)


def accuracy_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[summed cross-entropy, top-1 hits, top-5 hits, images] of one batch, in fp32."""
    if labels.numel() == 0:
        return torch.zeros(4, device=logits.device)
    loss, _ = classification_loss(logits, labels)
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    hits = top == labels[:, None]
    return torch.stack([loss, hits[:, 0].sum().float(), hits.any(-1).sum().float(),
                        torch.tensor(float(labels.numel()), device=logits.device)])


def summary_of(sums: torch.Tensor) -> dict:
    loss, top1, top5, n = (float(v) for v in sums)
    n = max(n, 1.0)
    return {"val_loss": loss / n, "val_acc1": 100 * top1 / n, "val_acc5": 100 * top5 / n, "val_images": int(n)}


class VisionTrainer(Trainer):
    unit = "images"

    def build_data(self) -> None:
        cfg, t, d = self.cfg, self.cfg.train, self.dist
        self.train_set, self.eval_set = open_splits(cfg.data)
        cfg.model.num_classes = cfg.model.num_classes or self.train_set.num_classes
        cfg.model.in_channels = cfg.model.in_channels or self.train_set.channels
        pin = d.device.type == "cuda"
        self.loader = vision_data.ImageTrainLoader(self.train_set, augment_config(cfg, train=True), t.global_batch,
                                                   t.micro_batch, d.rank, d.world_size, cfg.data.seed,
                                                   cfg.data.loader_workers, cfg.model.num_classes, pin)
        self.val_loader = validation_loader(cfg, self.eval_set, d.rank, d.world_size, pin_memory=pin)
        self.val_skipped = 0
        if self.loader.steps_per_epoch == 0:
            raise ValueError(f"{len(self.train_set)} training images do not fill one step of {t.global_batch}")
        self.n_params = count_parameters(cfg.model)
        self.total_steps = planned_steps(cfg, self.loader.steps_per_epoch)
        if self.total_steps <= 0:
            raise ValueError("a ViT run needs train.epochs (or train.steps) > 0")
        if cfg.optim.warmup_epochs >= 0:
            cfg.optim.warmup_steps = round(cfg.optim.warmup_epochs * self.loader.steps_per_epoch)

    def validation_batches(self) -> list:
        """The one validation batch kept on the device: the first, normalised, for the LaX statistics'
        forward (log_latent_stats). Validation itself streams the split (validate)."""
        images, labels = self.val_loader.first()
        return [(self.loader.batch_augment.normalize(images), labels)]

    def to_device(self, images: torch.Tensor, plan: vision_data.MixPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 pixels to the device, then normalisation, erasing and mixing there."""
        return self.loader.batch_augment(images.to(self.dist.device, non_blocking=True), plan)

    def selection_batches(self) -> list:
        """None in the run itself: a ViT's choices are made by runs that score the held-out training
        images (data.holdout with data.eval_split holdout; a reproduce plan's `select`)."""
        return []

    def selection_baseline(self) -> dict:
        return {}

    def scored(self, targets) -> int:
        return len(targets)

    def validate(self) -> dict:
        self.engine.train(False)
        device, normalize = self.dist.device, self.loader.batch_augment.normalize
        sums = torch.zeros(4, device=device)
        for images, labels in self.val_loader:
            sums += accuracy_sums(self.engine.predict(normalize(images.to(device, non_blocking=True))),
                                  labels.to(device, non_blocking=True))
        self.val_skipped = self.val_loader.skipped
        self.engine.train(True)
        record = {"step": self.step, "images": self.tokens, **summary_of(all_reduce_sum(sums)),
                  "skipped_images": int(all_reduce_sum(torch.tensor(float(self.loader.skipped + self.val_skipped),
                                                                    device=self.dist.device)))}
        self.last_val = record
        self.metrics.log(record, prefix="val")
        self.log(f"step {self.step}: val_loss {record['val_loss']:.4f}  top-1 {record['val_acc1']:.2f}%  "
                 f"top-5 {record['val_acc5']:.2f}%  ({record['val_images']} images)")
        return record

    def summarize(self, final: dict) -> tuple[dict, str]:
        fields = {k: final[k] for k in ("val_loss", "val_acc1", "val_acc5", "val_images", "skipped_images")}
        split = "held-out training images" if self.cfg.data.eval_split == "holdout" else "validation images"
        return fields, (f"top-1 accuracy {final['val_acc1']:.2f}% (top-5 {final['val_acc5']:.2f}%, loss "
                        f"{final['val_loss']:.4f}) on {final['val_images']} {split}")

    def baselines(self) -> dict:
        return {"chance_acc1": 100.0 / self.cfg.model.num_classes}

    def describe(self) -> str:
        cfg, t = self.cfg, self.cfg.train
        lax = f" + LaX ({cfg.model.lax_gate})" if cfg.model.uses_lax else ""
        intra = f", intra-layer LaX on {','.join(cfg.model.lax_intra_modules)}" if cfg.model.lax_intra_modules else ""
        return (f"model: ViT {cfg.model.method}{lax}{intra}, {self.n_params / 1e6:.2f}M parameters; "
                f"{self.total_steps} steps of {t.global_batch} images ({self.total_steps / self.loader.steps_per_epoch:.2f}"
                f" epochs of {len(self.train_set)}) on {self.dist.world_size} rank(s), engine "
                f"{cfg.parallel.engine}, precision {self.engine.precision}")

    def throughput_basis(self) -> tuple[float, float]:
        return self.cfg.train.global_batch, flops_per_image(self.cfg.model)["train"]


@torch.no_grad()
def evaluate_model(model, cfg: Config, device: torch.device, split: str = "val", limit: int = 0,
                   micro_batch: int = 0) -> dict:
    """Accuracy of a built ViT on one split of the run's data, on one process."""
    _, dataset = open_splits(dataclasses.replace(cfg.data, eval_split=split))
    loader = validation_loader(cfg, dataset, micro_batch=micro_batch, limit=limit, pin_memory=device.type == "cuda")
    normalize = vision_data.BatchAugment(augment_config(cfg, train=False), cfg.model.num_classes,
                                         dataset.channels).normalize
    sums = torch.zeros(4, device=device)
    for images, labels in loader:
        sums += accuracy_sums(model(normalize(images.to(device))), labels.to(device))
    return {**summary_of(sums), "skipped_images": loader.skipped, "split": split}
