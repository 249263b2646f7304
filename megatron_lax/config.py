"""Typed configuration: one dataclass per concern, presets named as in the paper, YAML files and
`--section.key value` command-line overrides.

A config file is YAML with an optional top-level `preset:` (a name from PRESETS) and one mapping
per section (`model:`, `optim:`, `data:`, `train:`, `parallel:`, `checkpoint:`, `logging:`, and for
fine-tuning `lora:` and `finetune:`).
Values are applied in this order: dataclass defaults, the preset, the file, the command line.

The model section is flat: beside ModelConfig's own fields it holds the fields each registered format
declares (`Format.fields`, a small dataclass in the format's file), merged into ModelConfig's field
table by `merge_plugin_fields`, so YAML, `--model.x`, --help and --print-config see them as any other.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from . import paper
from .method.base import ProjectionRules
from .method.formats import FORMATS, format_of
from .models import FAMILIES, family_of

PROJECTIONS = FAMILIES["llama"].projections  # what LoRA adapts (lora.targets): a LLaMA's
GATES = ("none", "identity", "linear", "dense", "tensor")
LOWRANK_INITS = ("auto", "cola", "matched", "kaiming")
GATE_INITS = ("identity", "small", "kaiming")
AUTO_AUGMENTS = ("none", "original")


class ConfigError(ValueError):
    """A configuration that cannot work; the message says which field and why."""


def plugin_field_classes() -> list[type]:
    """The dataclasses of model.* fields that the registered formats and families declare."""
    plugins = [*FORMATS.values(), *FAMILIES.values()]
    return [plugin.fields for plugin in plugins if plugin.fields is not None]


def merge_plugin_fields() -> None:
    """Adds every registered plug-in's fields to ModelConfig's field table (dataclasses.fields,
    asdict and replace then see them); a format registered at run time is merged at the next use."""
    table = ModelConfig.__dataclass_fields__
    for plugin in plugin_field_classes():
        for f in dataclasses.fields(plugin):
            if f.name not in table:
                table[f.name] = f
            elif table[f.name] is not f and _default(table[f.name]) != _default(f):
                raise ConfigError(f"model.{f.name} is declared twice with different defaults ({plugin.__name__})")


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@dataclass(init=False, repr=False, eq=False)
class ModelConfig(ProjectionRules):
    """The model section: the fields every family and format share, plus the registered formats'
    own (merge_plugin_fields). Built as ModelConfig(**values); a missing field takes its default."""
    arch: str = "llama"  # llama (decoder LM) | vit (image classifier)
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    ffn_dim: int = 688
    vocab_size: int = 0  # 0: follow the tokenizer, rounded up to a multiple of 64
    norm_eps: float = 1e-6
    max_seq_len: int = 2048
    init_std: float = 0.02  # embeddings, LM head, dense projections; low-rank factors see lowrank_init
    method: str = "dense"  # dense | svd (B A x) | cola (B act(A x)) | tt (tensor train; ViT)
    lowrank_init: str = "auto"  # auto | cola (factor std (r (d_in+d_out))^-1/4) | matched (B A std init_std) | kaiming (the official LaX ViT code's)
    rank: int = 0  # rank of every low-rank projection unless attn_rank / mlp_rank say otherwise
    attn_rank: Optional[int] = None  # q, k, v, o
    mlp_rank: Optional[int] = None  # gate, up, down (ViT: fc1, fc2)
    mlp_out_rank: Optional[int] = None  # the MLP's output projection (ViT fc2, LLaMA down); None: mlp_rank
    lax_gate: str = "none"  # none | identity | linear | dense | tensor
    lax_modules: list = field(default_factory=lambda: ["all"])  # projections that cross (all, or names)
    lax_norm: bool = True  # the LayerNorm on each crossing (the paper's Table 22 switches it off)
    lax_latent: str = "output"  # output (z after sum, LN, activation; recursive) | projection (A x)
    lax_gate_init: str = "identity"  # identity | small (dense gate only: N(0, 0.02^2) weight and a bias) | kaiming (tensor gate only: Kaiming-uniform cores, the official ViT code's)

    def __init__(self, **values):
        merge_plugin_fields()
        for f in dataclasses.fields(self):
            setattr(self, f.name, values.pop(f.name) if f.name in values else _default(f))
        if values:
            raise TypeError(f"ModelConfig has no field {', '.join(values)}")

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and dataclasses.asdict(self) == dataclasses.asdict(other)

    def __repr__(self) -> str:
        return f"ModelConfig({', '.join(f'{k}={v!r}' for k, v in dataclasses.asdict(self).items())})"

    @property
    def projections(self) -> tuple:
        return family_of(self).projections


    @property
    def resolved_lowrank_init(self) -> str:
        if self.lowrank_init != "auto":
            return self.lowrank_init
        return format_of(self).default_lowrank_init


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    warmup_steps: int = -1  # -1: warmup_ratio of the total steps
    warmup_ratio: float = 0.1
    warmup_epochs: float = -1.0  # ViT: warmup in epochs (-1: warmup_steps / warmup_ratio)
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 0.5  # on the global gradient norm; 0 disables


@dataclass
class DataConfig:
    path: str = "data/prepared/sample"  # prepared shards (data_prep.prepare output)
    raw: str = "data/sample"  # raw C4-format shards; prepared into `path` when it is missing, or streamed
    # prepared (shards in `path`) | stream (`raw` tokenised while training: a local folder or glob of C4-layout
    # shards, or hf:OWNER/NAME[/CONFIG] on the hub; megatron_lax/data/streaming.py)
    source: str = "prepared"
    stream_cache: str = "data/stream_cache"  # stream: validation tokens and unigram counts, cached after a first read
    hub_splits: list = field(default_factory=lambda: ["train", "validation"])  # stream from the hub: its splits
    # stream: training sources mixed by weight, PATH=WEIGHT each (a folder, glob or hf: name as `raw`); empty: `raw`
    # alone. Validation stays `raw`'s validation split
    sources: list = field(default_factory=list)
    shuffle_buffer: int = 1000  # stream: documents a lane's seeded shuffle buffer holds (0 or 1: file order)
    tokenizer: str = "tokenizer/sample"  # directory, .model file, HF directory or hub name
    seq_len: int = 256
    mode: str = "packed"  # packed | paper (one document per sequence, padded)
    val_tokens: int = 10_000_000
    seed: int = 0
    workers: int = 1  # preprocessing workers when `path` is prepared on the fly
    # --- images (model.arch vit): `path` is a class-folder root (train/, val/) or Fashion-MNIST idx files ---
    train_images: int = 0  # use the first N training images (0: all)
    holdout: int = 0  # training images held out (seeded) for choosing hyperparameters; never trained on
    eval_split: str = "val"  # what validation scores: val (the reported split) | holdout
    val_images: int = 0  # validation images (0: the whole split)
    loader_workers: int = 0  # decoding/augmenting (ViT) or tokenising (stream) processes per rank (0: in the training one)


@dataclass
class AugmentConfig:
    """Image augmentation (model.arch vit), DeiT's recipe by default (megatron_lax/data/image_augment.py)."""
    crop_scale_min: float = 0.08  # random-resized crop's smallest area fraction
    hflip: float = 0.5
    auto_augment: str = "none"  # none | original (AutoAugment's ImageNet policy; the official LaX command's)
    randaugment_n: int = 2  # RandAugment ops per image (0: off)
    randaugment_m: int = 9  # magnitude on timm's 0-10 scale (DeiT's rand-m9)
    mixup: float = 0.8  # Beta alpha (0: off)
    cutmix: float = 1.0  # Beta alpha (0: off)
    label_smoothing: float = 0.1
    random_erasing: float = 0.25  # probability per image (0: off)
    crop_pct: float = 0.875  # evaluation: resize the short side to image_size / crop_pct, then centre-crop


CHECKPOINTING_MODES = ("none", "block", "lowrank")
CHECKPOINTING_ALIASES = {"false": "none", "true": "block", "0": "none", "1": "block", "off": "none", "on": "block"}


@dataclass
class TrainConfig:
    steps: int = 0  # 0: follow token_budget (or, for a ViT, epochs)
    epochs: float = 0.0  # ViT: length in epochs of the training images (used when steps is 0)
    token_budget: str = "0"  # paper | chinchilla | a number such as 500M, 2B (0: use steps)
    allow_repetition: bool = False  # allow a budget larger than the prepared data
    global_batch: int = 512  # sequences per optimizer step
    micro_batch: int = 16  # sequences per forward/backward on one rank
    precision: str = "auto"  # auto | fp32 | bf16-mixed | bf16-pure
    eval_every: int = 0  # steps between validations; 0: only at the end
    eval_tokens: int = 0  # 0: data.val_tokens
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    activation_checkpointing: str = "none"  # none | block (recompute each block) | lowrank (keep the rank-r latents, CoLA-M); true/false: block/none
    compile: bool = False
    tf32: bool = False  # fp32 matmuls on TF32 tensor cores (Ampere and later), as timm's train.py runs "fp32"
    max_nonfinite: int = 5  # consecutive non-finite steps before the run stops
    stop_if_diverged: bool = False  # stop once the loss is non-finite or spikes (train.divergence_spike; LR sweeps)
    divergence_spike: float = 1.0  # nats the smoothed training loss may rise above its running best before a run counts as diverged
    select_tokens: int = 0  # a selection slice of the validation split, after the reported eval tokens (sweep choices; never reported)
    stop_after: int = 0  # pause after this step (validate, checkpoint, exit); the schedule keeps train.steps
    task: str = "auto"  # auto (the model family's: language_modeling, image_classification) | instruction_tuning


@dataclass
class ParallelConfig:
    engine: str = "single"  # single | ddp | fsdp | deepspeed
    zero_stage: int = 1  # deepspeed only: 1, 2 or 3 (stage 0 shards nothing: use engine ddp)
    deepspeed_config: str = ""  # a user's own DeepSpeed JSON instead of the generated one
    backend: str = "auto"  # auto | nccl | gloo


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0: only at the end
    keep: int = 2  # last K complete checkpoints kept
    resume: str = "none"  # none | auto | a checkpoint directory
    overwrite: bool = False  # start over in a run_dir that holds an earlier run: deletes its checkpoints and logs
    trust: bool = False  # unpickle checkpoint files that need it (DeepSpeed, older rank files): only for checkpoints you trust


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True
    lax_stats_every: int = 100  # steps between LaX gate / latent-RMS records; 0 disables
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0: known GPUs by name, measured on CPU


@dataclass
class LoraConfig:
    """Adapters on a frozen base (python -m megatron_lax.finetune); the paper's Tables 15-18."""
    rank: int = 32
    alpha: float = 64.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: ["q", "k", "v", "up", "down"])
    lax_gate: str = "none"  # none (plain LoRA) | identity | linear | dense | tensor
    lax_norm: bool = True  # LayerNorm on the crossed latent A x + G(z_prev)
    lax_latent: str = "output"  # as model.lax_latent: output (after sum and LayerNorm) | projection (A x)


@dataclass
class FinetuneConfig:
    """Instruction data (LLM-Adapters layout) and the model the adapters go on."""
    base: str = ""  # a run/checkpoint directory, a megatron_lax export, or a Hugging Face LlamaForCausalLM directory
    tokenizer: str = ""  # empty: the base's own
    train_json: str = ""
    test_json: list = field(default_factory=list)  # evaluated by python -m megatron_lax.finetune_eval
    cutoff_len: int = 256  # tokens of prompt + response + EOS; longer examples are cut
    val_size: int = 120  # examples held out of train_json for the validation loss (at least 1)
    epochs: int = 3  # used when train.steps is 0
    max_new_tokens: int = 64  # decoding length at evaluation
    num_beams: int = 4  # beam search at evaluation (LLM-Adapters: 4); 1 is greedy
    train_on_inputs: bool = True  # score the prompt too (LLM-Adapters' default); false: the response and EOS only
    add_bos: str = "auto"  # auto (the base's convention: its tokenizer's for a Hugging Face base, none for ours) | true | false
    keep_best: bool = True  # keep the checkpoint of the lowest validation loss in RUN/best and evaluate it
    full: bool = False  # full fine-tuning (every base weight trained, no adapters): the capacity ceiling
    base_fingerprint: str = ""  # set by the run: a hash of the base's weights; resume, evaluation and export check it


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- presets (GaLore / CoLA shapes; the paper's ranks and Table 14 schedules) -----------------------
# The vocabulary is not pinned: it follows the tokenizer (32,100 entries for t5-base -> 32,128 rows),
# and `info` counts parameters at the paper's 32,000 when no tokenizer is given.

def _llama(scale: paper.LlamaScale) -> dict:
    """A Table 14 scale: its shape, rank, steps and warmup (512 sequences of 256 tokens per step)."""
    return {
        "model": dict(dim=scale.dim, ffn_dim=scale.ffn_dim, n_heads=scale.n_heads, n_layers=scale.n_layers,
                      rank=scale.rank),
        "optim": dict(warmup_steps=scale.warmup),
        "train": dict(steps=scale.steps, global_batch=paper.SEQUENCES_PER_STEP),
    }


PRESETS: dict[str, dict] = {
    "llama_micro": {"model": dict(dim=128, ffn_dim=344, n_heads=4, n_layers=4, rank=32)},
    "llama_tiny": {"model": dict(dim=256, ffn_dim=688, n_heads=4, n_layers=4, rank=64)},
    "llama_mini": {"model": dict(dim=384, ffn_dim=1024, n_heads=6, n_layers=6, rank=96)},
    **{scale.preset: _llama(scale) for scale in paper.TABLE_14.values()},
}


def _vit(dim, n_heads, n_layers, rank, tt_attn, tt_fc1, tt_fc2, image_size=224, patch_size=16) -> dict:
    return {"model": dict(arch="vit", dim=dim, ffn_dim=4 * dim, n_heads=n_heads, n_layers=n_layers, rank=rank,
                          image_size=image_size, patch_size=patch_size, tt_attn_dims=tt_attn, tt_fc1_dims=tt_fc1,
                          tt_fc2_dims=tt_fc2)}


# ViTs: S/B/L at 224 px with 16 px patches (B and L as the paper's Table 1, tensor-train modes as its
# Table 13) and CPU shapes for 28 x 28 images (Fashion-MNIST) with 4 px patches.
PRESETS.update({
    "vit_micro": _vit(96, 3, 6, 24, [8, 12, 12, 8], [8, 12, 16, 24], [16, 24, 12, 8], image_size=28, patch_size=4),
    "vit_mini": _vit(192, 3, 6, 48, [12, 16, 16, 12], [12, 16, 24, 32], [24, 32, 16, 12], image_size=28,
                     patch_size=4),
    "vit_s": _vit(384, 6, 12, 128, [16, 24, 24, 16], [16, 24, 32, 48], [32, 48, 24, 16]),
    "vit_b": _vit(768, 12, 12, 256, [32, 24, 24, 32], [32, 24, 48, 64], [48, 64, 24, 32]),
    "vit_l": _vit(1024, 16, 24, 256, [32, 32, 32, 32], [32, 32, 64, 64], [64, 64, 32, 32]),
})


# --- building, validating, overriding --------------------------------------------------------------

def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    if cls is ModelConfig:
        merge_plugin_fields()
        for plugin in plugin_field_classes():
            hints.update(typing.get_type_hints(plugin))
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _parse_value(text: str, annotation) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Union:  # Optional[X]
        if text.lower() in ("none", "null", ""):
            return None
        inner = [a for a in typing.get_args(annotation) if a is not type(None)][0]
        return _parse_value(text, inner)
    if annotation is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"expected a boolean, got {text!r}")
    if annotation is int:
        try:
            return int(float(text)) if "e" in text.lower() else int(text)
        except OverflowError:
            raise ConfigError(f"expected an integer, got {text!r} (not a finite number)") from None
    if annotation is float:
        return float(text)
    if annotation is list or origin is list:
        return [item.strip() for item in text.split(",") if item.strip()]
    return text


def _coerce(value: Any, annotation, where: str) -> Any:
    try:
        if isinstance(value, str):
            return _parse_value(value, annotation)
        return _check_type(value, annotation)
    except (ValueError, ConfigError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_type(value: Any, annotation) -> Any:
    """A value YAML parsed as something other than a string, checked against (and converted to) the
    field's type: a list where a number belongs is an error here, not deep inside a run."""
    if typing.get_origin(annotation) is typing.Union:  # Optional[X]
        if value is None:
            return None
        annotation = [a for a in typing.get_args(annotation) if a is not type(None)][0]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation is int and number and float(value).is_integer():
        return int(value)
    if annotation is float and number:
        return float(value)
    if annotation is str and (number or isinstance(value, bool)):
        return str(value).lower() if isinstance(value, bool) else str(value)
    if (annotation is list or typing.get_origin(annotation) is list) and isinstance(value, list) and \
            all(isinstance(item, (str, int, float)) for item in value):
        return value
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(annotation, "a list")
    shown = "null" if value is None else f"{type(value).__name__} {value!r}"
    raise ConfigError(f"expected {expected}, got {shown}")


def apply_dict(cfg: Config, values: dict, source: str = "config") -> Config:
    """Merge a {section: {key: value}} mapping into cfg, refusing unknown sections and keys."""
    sections = _field_types(Config)
    for section, entries in (values or {}).items():
        if section == "preset":
            continue
        if section not in sections:
            raise ConfigError(f"{source}: unknown section {section!r} (known: {', '.join(sections)})")
        if not isinstance(entries, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        target = getattr(cfg, section)
        types = _field_types(type(target))
        for key, value in entries.items():
            if key not in types:
                raise ConfigError(f"{source}: unknown field {section}.{key} (known: {', '.join(types)})")
            setattr(target, key, _coerce(value, types[key], f"{source}: {section}.{key}"))
    return cfg


def load_config(name_or_path: Optional[str] = None, overrides: Optional[dict] = None) -> Config:
    """A preset name or a YAML path, then overrides ({"model.rank": "128", ...} or nested)."""
    cfg = Config()
    if name_or_path:
        if name_or_path in PRESETS:
            apply_dict(cfg, PRESETS[name_or_path], source=name_or_path)
        else:
            path = Path(name_or_path)
            if not path.is_file():
                raise ConfigError(f"config {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
            try:
                values = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
            except (UnicodeDecodeError, OSError) as e:
                raise ConfigError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or 'not UTF-8 text'})") \
                    from None
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: expected a mapping of sections")
            preset = values.get("preset")
            if preset is not None:
                if preset not in PRESETS:
                    raise ConfigError(f"{path}: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
                apply_dict(cfg, PRESETS[preset], source=preset)
            apply_dict(cfg, values, source=str(path))
    if overrides:
        nested: dict = {}
        for key, value in overrides.items():
            section, _, name = key.partition(".")
            if not name:
                raise ConfigError(f"override {key!r} must look like section.key")
            nested.setdefault(section, {})[name] = value
        apply_dict(cfg, nested, source="command line")
    validate(cfg)
    return cfg


# --- ranges and what a resume may change --------------------------------------------------------------

# The allowed range of each numeric field that has one: (lowest, highest), None for no bound. A value
# outside it (or NaN) is one line naming the field and the range, before any other check divides by it.
RANGES = {
    "model": {"dim": (1, None), "n_layers": (1, None), "n_heads": (1, None), "n_kv_heads": (0, None),
              "ffn_dim": (1, None), "vocab_size": (0, None), "max_seq_len": (1, None), "rank": (0, None),
              "attn_rank": (0, None), "mlp_rank": (0, None), "mlp_out_rank": (0, None), "image_size": (1, None),
              "patch_size": (1, None), "in_channels": (0, None), "num_classes": (0, None), "init_std": (0, None),
              "norm_eps": (0, None), "rope_theta": (0, None), "dropout": (0, 0.99)},
    "optim": {"lr": (0, None), "min_lr_ratio": (0, 1), "warmup_steps": (-1, None), "warmup_ratio": (0, 1),
              "weight_decay": (0, None), "beta1": (0, 1), "beta2": (0, 1), "eps": (0, None), "grad_clip": (0, None)},
    "data": {"seq_len": (1, None), "val_tokens": (0, None), "workers": (1, None), "train_images": (0, None),
             "holdout": (0, None), "val_images": (0, None), "loader_workers": (0, None)},
    "train": {"steps": (0, None), "epochs": (0, None), "global_batch": (1, None), "micro_batch": (1, None),
              "eval_every": (0, None), "eval_tokens": (0, None), "max_nonfinite": (1, None),
              "divergence_spike": (0, None), "select_tokens": (0, None), "stop_after": (0, None)},
    "checkpoint": {"every": (0, None), "keep": (1, None)},
    "logging": {"log_every": (1, None), "lax_stats_every": (0, None), "peak_flops": (0, None)},
}


def validate_ranges(cfg: Config) -> None:
    for section, fields in RANGES.items():
        for name, (low, high) in fields.items():
            value = getattr(getattr(cfg, section), name)
            if value is None or (low is None or value >= low) and (high is None or value <= high):
                continue
            allowed = f"at least {low}" if high is None else f"between {low} and {high}"
            raise ConfigError(f"{section}.{name} must be {allowed}, got {value}")


# What a resume may not change (training.checkpoint.check_compatible): every model field except
# those below, which change neither the weights' shapes nor the function they compute (a kernel
# choice, regularisation), and the data and training fields that set what a saved data position means.
RESUME_MAY_CHANGE = {"model": ("flash_attn", "dropout", "head_dropout")}
RESUME_FIXED = {"data": ("seq_len", "mode", "seed", "source", "train_images", "holdout"),
                "train": ("global_batch",)}


def resume_fixed_fields() -> dict[str, tuple]:
    model = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in RESUME_MAY_CHANGE["model"])
    return {"model": model, **RESUME_FIXED}


def validate(cfg: Config) -> None:
    validate_ranges(cfg)
    validate_model(cfg.model)
    validate_augment(cfg.augment)
    validate_run(cfg)


def validate_model(m: ModelConfig) -> None:
    if m.arch not in FAMILIES:
        raise ConfigError(f"model.arch {m.arch!r} is unknown (choose from {', '.join(FAMILIES)})")
    if m.method not in FORMATS:
        raise ConfigError(f"model.method {m.method!r} is unknown (choose from {', '.join(FORMATS)})")
    if m.lax_gate not in GATES:
        raise ConfigError(f"model.lax_gate {m.lax_gate!r} is unknown (choose from {', '.join(GATES)})")
    if m.lowrank_init not in LOWRANK_INITS:
        raise ConfigError(f"model.lowrank_init {m.lowrank_init!r} is unknown (choose from {', '.join(LOWRANK_INITS)})")
    if m.lax_latent not in ("output", "projection"):
        raise ConfigError(f"model.lax_latent {m.lax_latent!r} is unknown (output or projection)")
    if m.lax_gate_init not in GATE_INITS:
        raise ConfigError(f"model.lax_gate_init {m.lax_gate_init!r} is unknown (choose from {', '.join(GATE_INITS)})")
    if m.lax_gate_init == "small" and m.lax_gate != "dense":
        raise ConfigError(f"model.lax_gate_init small applies to the dense gate only, not {m.lax_gate!r}")
    if m.lax_gate_init == "kaiming" and m.lax_gate != "tensor":
        raise ConfigError(f"model.lax_gate_init kaiming applies to the tensor gate only, not {m.lax_gate!r}")
    unknown = [p for p in m.lax_modules if p not in m.projections + ("all",)]
    if unknown:
        raise ConfigError(f"model.lax_modules has unknown projections {unknown} (known for {m.arch}: all, "
                          f"{', '.join(m.projections)})")
    if m.dim % m.n_heads != 0:
        raise ConfigError(f"model.dim {m.dim} is not divisible by model.n_heads {m.n_heads}")
    try:
        family_of(m).validate(m)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    validate_formats(m)


def validate_formats(m: ModelConfig) -> None:
    """The chosen format checks its config; the others check that none of their fields is set."""
    try:
        for name, fmt in FORMATS.items():
            if name == m.method:
                fmt.validate(m, family_of(m).projection_shapes(m))
            else:
                fmt.validate_unused(m)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def validate_augment(a: AugmentConfig) -> None:
    if a.auto_augment not in AUTO_AUGMENTS:
        raise ConfigError(f"augment.auto_augment {a.auto_augment!r} is unknown (choose from {', '.join(AUTO_AUGMENTS)})")
    if a.auto_augment != "none" and a.randaugment_n > 0:
        raise ConfigError("augment.auto_augment and RandAugment (augment.randaugment_n > 0) are alternatives; "
                          "set augment.randaugment_n 0 to use AutoAugment")
    if not 0.0 < a.crop_pct <= 1.0:
        raise ConfigError(f"augment.crop_pct must lie in (0, 1], got {a.crop_pct}")


def validate_run(cfg: Config) -> None:
    """The data, training, parallel and checkpoint sections, and fine-tuning's."""
    if cfg.data.eval_split not in ("val", "holdout"):
        raise ConfigError(f"data.eval_split {cfg.data.eval_split!r} is unknown (val or holdout)")
    if cfg.data.eval_split == "holdout" and cfg.data.holdout <= 0:
        raise ConfigError("data.eval_split holdout needs data.holdout > 0 training images held out")
    if cfg.data.source not in ("prepared", "stream"):
        raise ConfigError(f"data.source {cfg.data.source!r} is unknown (prepared or stream)")
    if cfg.data.source == "stream" and len(cfg.data.hub_splits) != 2:
        raise ConfigError(f"data.hub_splits must name two splits (train, validation), got {cfg.data.hub_splits}")
    if cfg.data.shuffle_buffer < 0:
        raise ConfigError(f"data.shuffle_buffer must be >= 0 documents, got {cfg.data.shuffle_buffer}")
    if cfg.data.sources and cfg.data.source != "stream":
        raise ConfigError("data.sources mixes streamed sources: it needs data.source stream")
    if cfg.data.mode not in ("packed", "paper"):
        raise ConfigError(f"data.mode {cfg.data.mode!r} is unknown (packed or paper)")
    if cfg.train.precision not in ("auto", "fp32", "bf16-mixed", "bf16-pure"):
        raise ConfigError(f"train.precision {cfg.train.precision!r} is unknown (auto, fp32, bf16-mixed, bf16-pure)")
    mode = str(cfg.train.activation_checkpointing).lower()
    cfg.train.activation_checkpointing = CHECKPOINTING_ALIASES.get(mode, mode)
    if cfg.train.activation_checkpointing not in CHECKPOINTING_MODES:
        raise ConfigError(f"train.activation_checkpointing {mode!r} is unknown ({', '.join(CHECKPOINTING_MODES)}; "
                          f"true and false mean block and none)")
    if cfg.parallel.engine not in ("single", "ddp", "fsdp", "deepspeed"):
        raise ConfigError(f"parallel.engine {cfg.parallel.engine!r} is unknown (single, ddp, fsdp, deepspeed)")
    if cfg.parallel.zero_stage not in (1, 2, 3):
        hint = "; stage 0 shards nothing: use parallel.engine ddp" if cfg.parallel.zero_stage == 0 else ""
        raise ConfigError(f"parallel.zero_stage must be 1, 2 or 3, got {cfg.parallel.zero_stage}{hint}")
    if cfg.train.compile and cfg.parallel.engine == "deepspeed" and cfg.parallel.zero_stage == 3:
        raise ConfigError("train.compile does not run under ZeRO-3 (its parameter gathering cannot be compiled into a "
                          "block): use parallel.engine fsdp, parallel.zero_stage 1 or 2, or train.compile false")
    if cfg.checkpoint.overwrite and cfg.checkpoint.resume == "auto":
        raise ConfigError("checkpoint.overwrite true starts the run over, checkpoint.resume auto continues it: "
                          "choose one")
    if cfg.train.global_batch <= 0 or cfg.train.micro_batch <= 0:
        raise ConfigError("train.global_batch and train.micro_batch must be positive")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must lie in [0, 1], got {cfg.optim.min_lr_ratio}")
    validate_lora(cfg.lora, cfg.finetune)


def validate_lora(lora: LoraConfig, finetune: FinetuneConfig) -> None:
    if lora.rank <= 0:
        raise ConfigError(f"lora.rank must be positive, got {lora.rank}")
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout must lie in [0, 1), got {lora.dropout}")
    unknown = [p for p in lora.targets if p not in PROJECTIONS]
    if unknown or not lora.targets:
        raise ConfigError(f"lora.targets has unknown projections {unknown} (known: {', '.join(PROJECTIONS)})")
    if lora.lax_gate not in GATES:
        raise ConfigError(f"lora.lax_gate {lora.lax_gate!r} is unknown (choose from {', '.join(GATES)})")
    if lora.lax_latent not in ("output", "projection"):
        raise ConfigError(f"lora.lax_latent {lora.lax_latent!r} is unknown (output or projection)")
    if finetune.cutoff_len < 2 or finetune.epochs <= 0 or finetune.val_size <= 0:
        raise ConfigError("finetune.cutoff_len must be at least 2, finetune.epochs and finetune.val_size positive")
    if finetune.num_beams < 1 or finetune.max_new_tokens < 1:
        raise ConfigError("finetune.num_beams and finetune.max_new_tokens must be at least 1")
    if str(finetune.add_bos).lower() not in ("auto", "true", "false"):
        raise ConfigError(f"finetune.add_bos {finetune.add_bos!r} is unknown (auto, true or false)")


# --- command line ----------------------------------------------------------------------------------

def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds --config and one --section.key option per field, each with its default in the help."""
    parser.add_argument("--config", help=f"YAML file or preset ({', '.join(PRESETS)})")
    defaults = Config()
    for section, section_type in _field_types(Config).items():
        group = parser.add_argument_group(section)
        for key, annotation in _field_types(section_type).items():
            default = getattr(getattr(defaults, section), key)
            shown = ",".join(default) if isinstance(default, list) else default
            group.add_argument(f"--{section}.{key}", dest=f"override:{section}.{key}", metavar="V",
                               default=argparse.SUPPRESS, help=f"(default: {shown})")


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {k.split(":", 1)[1]: v for k, v in vars(args).items() if k.startswith("override:")}
    return load_config(args.config, overrides)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
