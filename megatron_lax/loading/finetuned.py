"""Fine-tuned models: a fine-tuning run's adapters on its base, a LaX-LoRA export, and the recipe
that builds a Hugging Face base shard by shard for FSDP2 / ZeRO-3 fine-tuning."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config, load_config
from ..method.init import assign_parameters
from ..models import family_of
from ..models.lora import adapter_value, apply_lora
from ..parallel import ModelRecipe, consolidated_state_dict
from ..training import checkpoint
from .bases import base_fingerprint, base_kind, base_tokenizer, check_base, is_finetune_run, load_base
from .huggingface import HFWeights, check_hf_names, hf_name_map, load_hf_llama, read_hf_config, tied_name
from .ours import LAX_LORA_FORMAT, load_checkpoint_model, load_pretrained, read_safetensors

def load_finetuned(path, device: torch.device = torch.device("cpu")):
    """(model, config, checkpoint directory) of a fine-tuning run or checkpoint of any engine. A
    LoRA checkpoint holds the adapters only: the frozen weights come from the run's base, which
    must be the one it was trained on (fingerprint). Full fine-tuning checkpoints hold everything."""

    ckpt = checkpoint.intact_checkpoint_dir(path)
    cfg = checkpoint.checkpoint_config(ckpt)
    state = {k: v.float() for k, v in consolidated_state_dict(ckpt).items()}
    adapt = (lambda m: m) if cfg.finetune.full else (lambda m: apply_lora(m, cfg.lora, seed=cfg.train.seed))
    with torch.device("meta"):
        names = adapt(family_of(cfg.model).build(cfg.model, init_seed=None)).state_dict().keys()
    if all(k in state for k in names):
        model = adapt(family_of(cfg.model).build(cfg.model, init_seed=None))
    else:  # adapters only: the frozen weights are the base's
        base = load_base(cfg.finetune.base)
        check_base(cfg, base, ckpt)
        model = adapt(base)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in dict(model.named_parameters()) or model.get_parameter(k).requires_grad]
    if unexpected or (missing and cfg.finetune.full) or any(".adapter." in k for k in missing):
        raise checkpoint.CheckpointError(f"{ckpt}: the checkpoint does not fit its config (missing {missing[:3]}, "
                                         f"unexpected {unexpected[:3]})")
    return model.to(device).eval(), cfg, ckpt


def selected_checkpoint(path) -> Path:
    """The checkpoint a run is evaluated and exported from: RUN/best (the lowest validation loss) when
    finetune.keep_best kept one, else the path as given (a run's latest, or a checkpoint)."""
    path = Path(path)
    best = path / "best"
    if (path / "config.yaml").is_file() and best.is_dir() and checkpoint.checkpoint_config(path).finetune.keep_best:
        try:
            return checkpoint.resolve_checkpoint_dir(best)
        except checkpoint.CheckpointError:
            pass
    return path


def load_lax_lora(directory, base: str | None = None, device: str = "cpu") -> torch.nn.Module:
    """A LaX-LoRA export on its base (the one the run used unless `base` names another copy)."""
    directory = Path(directory)
    if not (directory / LAX_LORA_FORMAT).is_file():
        raise ValueError(f"{directory} is not a LaX-LoRA export")
    cfg = load_config(str(directory / "config.yaml"))
    base_model = load_base(base or cfg.finetune.base)
    check_base(cfg, base_model, directory)
    model = apply_lora(base_model, cfg.lora)
    adapters = read_safetensors(directory / "adapter_model.safetensors")
    missing, unexpected = model.load_state_dict(adapters, strict=False)
    missing = [k for k in missing if ".adapter." in k]
    if missing or unexpected:
        raise ValueError(f"{directory}: the adapters do not fit the base (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    return model.to(device).eval()


def finetune_recipe(cfg: Config):
    """A ModelRecipe for fine-tuning a Hugging Face base on FSDP2 or ZeRO-3: the adapted model is
    built on the meta device (or partitioned as it is built), and each parameter is then read from
    the base's files, or initialised for an adapter, and handed to its shards one at a time."""

    directory = Path(cfg.finetune.base)
    hf, model_cfg = read_hf_config(directory)
    weights, names = HFWeights(directory), hf_name_map(model_cfg.n_layers)
    tied = bool(hf.get("tie_word_embeddings", False))
    check_hf_names(weights.keys(), names, model_cfg.n_layers, tied)
    full = cfg.finetune.full

    def build():
        model = family_of(model_cfg).build(model_cfg, init_seed=None)
        return model.requires_grad_(True) if full else apply_lora(model, cfg.lora, seed=cfg.train.seed, init=False)

    def initialize(model):
        rules = model.weight_init_rules()
        shape_of = lambda p: tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
        sample = []

        def value_of(name, p):
            if ".adapter." in name:
                return adapter_value(name, shape_of(p), cfg.train.seed, rules)
            tensor = weights.get(tied_name(names[name.replace(".base.", ".")], weights, tied))
            sample.append((name.replace(".base.", "."), tensor))
            return tensor
        assign_parameters(model, value_of)
        cfg.finetune.base_fingerprint = base_fingerprint(sample)
    return model_cfg, ModelRecipe(build=build, initialize=initialize)


def load_any(path) -> tuple[torch.nn.Module, str]:
    """(model, tokenizer spec) of whatever `path` is: our export, a Hugging Face directory, a
    fine-tuning run (its selected checkpoint, adapters on its base) or a pre-training checkpoint."""
    path = Path(path)
    kind = base_kind(str(path))
    if kind == "export":
        return load_pretrained(path), str(path / "tokenizer")
    if kind == "huggingface":
        return load_hf_llama(path), base_tokenizer(str(path))
    if is_finetune_run(path):
        model, cfg, _ = load_finetuned(selected_checkpoint(path))
        return model, cfg.data.tokenizer
    model, cfg, _ = load_checkpoint_model(path)
    return model, cfg.data.tokenizer
