"""Instruction tuning: LoRA and LaX-LoRA fine-tuning on instruction data

    python -m megatron_lax.finetune --config configs/finetune_arithmetic.yaml [--section.key value ...]

The base (finetune.base) is one of our run or checkpoint directories (any engine), one of our
exports, or a local Hugging Face LlamaForCausalLM directory; it is frozen, and adapters go on the
projections in lora.targets (lora.lax_gate other than none adds LaX between blocks). Everything
else is pre-training's: the engines, precision, run directory, metrics, checkpoints and exact
resume. The schedule is LLM-Adapters': linear warmup over optim.warmup_steps, then linear decay to 0.
Accuracy on test files: python -m megatron_lax.finetune_eval.
"""
from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import torch

from ..config import Config
from ..data import instructions
from ..loading.bases import base_fingerprint, base_kind, base_tokenizer, load_base
from ..loading.finetuned import finetune_recipe
from ..models import family_of
from ..models.lora import apply_lora
from ..parallel.distributed import DistInfo
from ..parallel.engine import resolve_precision
from ..parallel import trust
from ..training import checkpoint
from ..parallel.optim import warmup_steps
from .language_modeling import TokenPrediction


# --- the base model ---------------------------------------------------------------------------------

def build_finetune_model(cfg: Config, precision: str = "fp32"):
    """The frozen base with adapters (or, with finetune.full, the whole base trainable), or for a
    Hugging Face base on FSDP2 / ZeRO-3 a recipe that builds it on the meta device and loads it shard
    by shard. Sets cfg.model to the base's shape and cfg.finetune.base_fingerprint to its weights'
    fingerprint, so the run's config names the model its checkpoints belong to. Under bf16 training
    on the single and DDP engines the frozen projections and LM head are held in bf16 (the
    embedding, norms and adapters stay fp32)."""
    f, engine = cfg.finetune, cfg.parallel.engine
    sharded = engine == "fsdp" or (engine == "deepspeed" and cfg.parallel.zero_stage == 3)
    if sharded and base_kind(f.base) == "huggingface":
        cfg.model, recipe = finetune_recipe(cfg)
        return recipe
    frozen_bf16 = not f.full and engine in ("single", "ddp") and precision in ("bf16-mixed", "bf16-pure")
    with trust.trusting(everything=cfg.checkpoint.trust):
        base = load_base(f.base, torch.bfloat16 if frozen_bf16 else torch.float32)
    if frozen_bf16:
        for module in [base.embed, base.norm] + [m for b in base.layers for m in (b.attn_norm, b.mlp_norm)]:
            module.float()
    f.base_fingerprint = base_fingerprint(base.named_parameters())
    model = base.requires_grad_(True) if f.full else apply_lora(base, cfg.lora, seed=cfg.train.seed)
    cfg.model = dataclasses.replace(model.cfg)
    return model


def uses_bos(add_bos: str, base: str, tokenizer) -> bool:
    """Whether prompts start with BOS: finetune.add_bos true/false, or auto: the base's own convention.
    A Hugging Face base follows its tokenizer (LLaMA's adds BOS; a tokenizer without one, none); our
    own bases were pre-trained without BOS, so none."""
    choice = str(add_bos).lower()
    if choice in ("true", "false"):
        if choice == "true" and tokenizer.bos_id < 0:
            raise ValueError("finetune.add_bos true, but the tokenizer has no BOS token")
        return choice == "true"
    if not base or not Path(base).is_dir() or base_kind(base) != "huggingface" or tokenizer.bos_id < 0:
        return False
    if tokenizer.kind == "sentencepiece":  # LLaMA's tokenizer.model: its Hugging Face wrapper adds BOS
        return True
    ids = tokenizer.backend("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_id


def linear_lr(step: int, total_steps: int, warmup: int, peak: float) -> float:
    """Linear warmup from 0 to the peak, then linear decay to 0 at the end (LLM-Adapters' schedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def method_label(cfg: Config) -> str:
    gate = cfg.lora.lax_gate
    if cfg.finetune.full:
        return "full fine-tuning"
    if gate == "none":
        return "LoRA"
    latent = "" if cfg.lora.lax_latent == "output" else ", projection latent"
    return f"LaX-LoRA ({gate}{'' if cfg.lora.lax_norm else ', no LayerNorm'}{latent})"


# --- the task ------------------------------------------------------------------------------------------

# Fields whose change makes a fine-tuning checkpoint unusable for a resume (pre-training's shape
# fields are checked too).
RESUME_FIELDS = {"lora": ("rank", "alpha", "dropout", "targets", "lax_gate", "lax_norm", "lax_latent"),
                 "finetune": ("base", "base_fingerprint", "train_json", "cutoff_len", "val_size", "train_on_inputs",
                              "add_bos", "full")}


class InstructionTuning(TokenPrediction):
    """Adapters (or, with finetune.full, every weight) trained on instruction data over a frozen base."""

    def __init__(self, cfg: Config, dist: DistInfo):
        from ..data.tokenizer import load_tokenizer

        super().__init__(cfg, dist)
        cfg, t, f = self.cfg, self.cfg.train, self.cfg.finetune
        self.keep_best = f.keep_best
        cfg.data.tokenizer = f.tokenizer or base_tokenizer(f.base)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        records, skipped = instructions.read_records(f.train_json)
        bos = uses_bos(f.add_bos, f.base, self.tokenizer)
        f.add_bos = "true" if bos else "false"  # resolved: evaluation and resume read it from the run's config
        examples = instructions.tokenize(records, self.tokenizer, f.cutoff_len, skipped, f.train_on_inputs, bos)
        if skipped and dist.is_main:
            print(instructions.describe_skipped(f.train_json, skipped))
        if not examples:
            raise ValueError(f"{f.train_json}: no usable training examples")
        train, self.val_examples = instructions.split_validation(examples, f.val_size, cfg.data.seed)
        self.pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id >= 0 else self.tokenizer.eos_id
        self.loader = instructions.InstructLoader(train, t.global_batch, t.micro_batch, self.pad_id, dist.rank,
                                                  dist.world_size, cfg.data.seed)
        self.total_steps = t.steps or f.epochs * self.loader.steps_per_epoch
        self.mean_length = statistics.fmean(len(e.ids) - 1 for e in train)
        self.n_trainable: int | None = None

    def model(self):
        """Sets cfg.model to the base's shape and finetune.base_fingerprint (for a recipe: once the engine
        has loaded the base)."""
        model = build_finetune_model(self.cfg, resolve_precision(self.cfg.train.precision, self.dist.device))
        if self.tokenizer.vocab_size > self.cfg.model.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} entries but the base model's vocabulary "
                             f"has {self.cfg.model.vocab_size}")
        return model

    def attach(self, engine) -> None:
        engine.trainable_only = not self.cfg.finetune.full  # checkpoints: the adapters, not the frozen base
        parameters = list(engine.base_model.parameters())
        self.n_params = sum(getattr(p, "ds_numel", p.numel()) for p in parameters)
        self.n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in parameters if p.requires_grad)

    def check_resume(self, checkpoint_dir: Path) -> None:
        check_same_adapters(checkpoint_dir, self.cfg)

    def validation_batches(self) -> list:
        """This rank's share of the held-out examples. Every rank gets as many batches (a short rank
        repeats an example with nothing scored), so sharded engines meet in every forward."""
        world, micro = self.dist.world_size, self.cfg.train.micro_batch
        mine = self.val_examples[self.dist.rank::world]
        batches = instructions.batches(mine, micro, self.pad_id)
        per_rank = -(-len(self.val_examples) // (world * micro)) if world > 1 else len(batches)
        while len(batches) < per_rank:
            x, y = instructions.collate(self.val_examples[:1], self.pad_id)
            batches.append((x, torch.full_like(y, instructions.IGNORE)))
        return batches

    def learning_rate(self, step: int) -> float:
        return linear_lr(step, self.total_steps, warmup_steps(self.cfg.optim, self.total_steps), self.cfg.optim.lr)

    def describe(self, engine) -> str:
        cfg, t = self.cfg, self.cfg.train
        adapters = "" if cfg.finetune.full else f" r={cfg.lora.rank} alpha={cfg.lora.alpha:g} on {','.join(cfg.lora.targets)}"
        return (f"{method_label(cfg)}{adapters}: "
                f"{self.n_trainable:,} trainable of {self.n_params:,} parameters "
                f"({100 * self.n_trainable / self.n_params:.2f}%); {self.total_steps} steps of {t.global_batch} "
                f"examples ({len(self.loader.examples)} training, {len(self.val_examples)} held out) on "
                f"{self.dist.world_size} rank(s), engine {cfg.parallel.engine}, precision {engine.precision}")

    def throughput_basis(self) -> tuple[float, float]:
        """Tokens per step on average (padding excluded). FLOPs per token: the frozen base needs the
        forward and the backward to its inputs but no weight gradients, about 2x the forward."""
        length = max(1, round(self.mean_length))
        return self.cfg.train.global_batch * self.mean_length, 2 * family_of(self.cfg.model).flops(self.cfg.model, length)["forward"]


def check_same_adapters(directory: Path, cfg: Config) -> None:
    saved = checkpoint.checkpoint_config(directory)
    differences = [f"{section}.{name}: {getattr(getattr(saved, section), name)!r} -> "
                   f"{getattr(getattr(cfg, section), name)!r}"
                   for section, names in RESUME_FIELDS.items() for name in names
                   if getattr(getattr(saved, section), name) != getattr(getattr(cfg, section), name)]
    if differences:
        raise checkpoint.CheckpointError(f"cannot resume from {directory} with other adapters or data: "
                                         + "; ".join(differences))
