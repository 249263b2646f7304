"""Loading models, in one place: our checkpoints (any engine), our exports, local Hugging Face
LLaMA directories, and fine-tuning runs (adapters on their base).

    load_checkpoint_model(DIR)   a pre-training checkpoint or run directory (sharded engines consolidated)
    load_pretrained(DIR)         our export of a LaX / CoLA model
    load_hf_llama(DIR)           a Hugging Face LlamaForCausalLM directory, as our dense LlamaLax
    load_base(SPEC)              any of the three as a dense base for fine-tuning (SVD merged)
    load_finetuned(RUN)          a fine-tuning run: its adapters (its checkpoints hold nothing else) on its base
    load_lax_lora(DIR)           a LaX-LoRA export on its base
    finetune_recipe(CFG)         a Hugging Face base built on the meta device (or inside ZeRO-3's
                                 zero.Init) and filled tensor by tensor as each rank's shards are
                                 allocated: no rank ever holds the whole model

A base is identified by its path and by a fingerprint of its weights (`base_fingerprint`), which
fine-tuning records in the run's config: resume, evaluation and export refuse another base.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from . import checkpoint, trust
from .config import Config, ModelConfig, load_config
from .models.llama import LlamaLax

OUR_FORMAT = "megatron_lax.json"
LAX_LORA_FORMAT = "megatron_lax_lora.json"
HF_NAMES = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
            "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
            "mlp.down": "mlp.down_proj", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


def mergeable(cfg: ModelConfig) -> bool:
    return cfg.method == "dense" or (cfg.method == "svd" and not cfg.uses_lax)


def hf_state_dict(model: LlamaLax) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face LLaMA names; SVD factors merged into W = B A. Both codebases use
    the rotate-half rotary convention, so q and k need no permutation."""
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
           "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(model.layers):
        for ours, theirs in HF_NAMES.items():
            module = block.get_submodule(ours)
            weight = module.B.weight @ module.A.weight if hasattr(module, "A") else module.weight
            out[f"model.layers.{i}.{theirs}.weight"] = weight
    return {k: v.detach().contiguous().float() for k, v in out.items()}


# --- Hugging Face LLaMA -> our dense model ---------------------------------------------------------------

def model_config_from_hf(hf: dict, where: str) -> ModelConfig:
    """Our dense ModelConfig for a Hugging Face LLaMA config.json, refusing in one line what our model
    does not compute the same way."""
    heads = hf.get("num_attention_heads")
    refusals = [
        (hf.get("model_type", "llama") != "llama", f"model_type {hf.get('model_type')!r} is not llama"),
        (not heads or not hf.get("num_key_value_heads", heads) or heads % hf.get("num_key_value_heads", heads) != 0,
         f"num_key_value_heads {hf.get('num_key_value_heads')} does not divide num_attention_heads {heads}"),
        (hf.get("rope_scaling") is not None, f"rope_scaling {hf.get('rope_scaling')} is not supported"),
        (hf.get("hidden_act", "silu") != "silu", f"hidden_act {hf.get('hidden_act')!r} is not silu"),
        (bool(hf.get("attention_bias")) or bool(hf.get("mlp_bias")), "attention or MLP biases are not supported"),
        (heads and hf.get("head_dim", hf.get("hidden_size", 0) // heads) != hf.get("hidden_size", 0) // heads,
         "a head_dim other than hidden_size / num_attention_heads is not supported"),
    ]
    for refused, reason in refusals:
        if refused:
            raise ValueError(f"{where}: {reason}")
    try:
        return ModelConfig(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads,
                           n_kv_heads=hf.get("num_key_value_heads", heads),
                           ffn_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                           norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(hf.get("rope_theta", 10000.0)),
                           max_seq_len=hf.get("max_position_embeddings", 2048), method="dense")
    except KeyError as e:
        raise ValueError(f"{where}: config.json has no {e.args[0]}") from None


def hf_name_map(n_layers: int) -> dict[str, str]:
    """Our dense model's parameter names -> Hugging Face LLaMA's."""
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    for i in range(n_layers):
        names.update({f"layers.{i}.{mine}.weight": f"model.layers.{i}.{theirs}.weight"
                      for mine, theirs in HF_NAMES.items()})
    return names


def state_dict_from_hf(weights: dict, n_layers: int, tied: bool = False) -> dict:
    """Our dense model's state dict from Hugging Face LLaMA weights (rotary buffers ignored; a tied
    LM head is copied from the embedding)."""
    ours = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
            "lm_head.weight": "lm_head.weight"}
    for i in range(n_layers):
        ours.update({f"model.layers.{i}.{theirs}.weight": f"layers.{i}.{mine}.weight" for mine, theirs in HF_NAMES.items()})
    if tied and "lm_head.weight" not in weights:
        weights = {**weights, "lm_head.weight": weights["model.embed_tokens.weight"]}
    unexpected = [k for k in weights if k not in ours and not k.endswith("rotary_emb.inv_freq")]
    missing = [k for k in ours if k not in weights]
    if unexpected or missing:
        raise ValueError(f"the weights do not fit a LLaMA of {n_layers} layers: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return {ours[k]: v.float() for k, v in weights.items() if k in ours}


class HFWeights:
    """The tensors of a Hugging Face model directory (model.safetensors, pytorch_model.bin, or a
    sharded index of either), read one tensor at a time: safetensors files are opened lazily and
    only the tensor asked for is read; .bin shards are memory-mapped."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.files: dict[str, Path] = {}
        for stem, suffix in (("model", ".safetensors"), ("pytorch_model", ".bin")):
            single, index = self.directory / f"{stem}{suffix}", self.directory / f"{stem}{suffix}.index.json"
            if single.is_file():
                self.files = {name: single for name in self._names(single)}
            elif index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                    self.files = {name: self.directory / shard for name, shard in weight_map.items()}
                except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
                    raise ValueError(f"{index}: not a valid weight index") from None
            if self.files:
                return
        raise ValueError(f"{self.directory}: no model.safetensors, pytorch_model.bin or sharded index")

    def _names(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), "pt") as f:
                return list(f.keys())
        return list(self._bin(path))

    def _bin(self, path: Path) -> dict:
        cache = self.__dict__.setdefault("_bins", {})
        if path not in cache:
            cache[path] = trust.load_tensors(path, mmap=True)
        return cache[path]

    def keys(self):
        return self.files.keys()

    def __contains__(self, name) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        path = self.files[name]
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), "pt") as f:
                return f.get_tensor(name)
        return self._bin(path)[name]


def read_hf_weights(directory: Path) -> dict:
    """Every tensor of model.safetensors / pytorch_model.bin, or of their sharded index."""
    weights = HFWeights(directory)
    return {name: weights.get(name) for name in weights.keys()}


def read_hf_config(directory) -> tuple[dict, ModelConfig]:
    directory = Path(directory)
    try:
        hf = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{directory / 'config.json'}: cannot read it ({e})") from None
    return hf, model_config_from_hf(hf, str(directory))


def load_hf_llama(directory, dtype: torch.dtype = torch.float32) -> LlamaLax:
    """A local Hugging Face LlamaForCausalLM directory as our dense LlamaLax on the CPU, in `dtype`:
    built on the meta device and given its tensors one by one (never a second copy of the model)."""
    directory = Path(directory)
    hf, cfg = read_hf_config(directory)
    try:
        weights = HFWeights(directory)
        names = hf_name_map(cfg.n_layers)
        tied = bool(hf.get("tie_word_embeddings", False))
        check_hf_names(weights.keys(), names, cfg.n_layers, tied)
        with torch.device("meta"):
            model = LlamaLax(cfg, init_seed=None)
        state = {ours: weights.get(tied_name(theirs, weights, tied)).to(dtype) for ours, theirs in names.items()}
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{directory}: cannot read the weights ({str(e).splitlines()[0]})") from None
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{directory}: the weights do not fit config.json ({str(e).splitlines()[-1].strip()})") from None
    return model.eval()


def tied_name(name: str, weights: HFWeights, tied: bool) -> str:
    return "model.embed_tokens.weight" if tied and name == "lm_head.weight" and name not in weights else name


def check_hf_names(available, names: dict, n_layers: int, tied: bool) -> None:
    available = set(available)
    expected = set(names.values()) - ({"lm_head.weight"} if tied else set())
    unexpected = [k for k in available if k not in set(names.values()) and not k.endswith("rotary_emb.inv_freq")]
    missing = sorted(expected - available)
    if unexpected or missing:
        raise ValueError(f"the weights do not fit a LLaMA of {n_layers} layers: missing {missing[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")


# --- our checkpoints and exports ---------------------------------------------------------------------------

def load_checkpoint_model(path: Path, device: torch.device = torch.device("cpu")):
    """(model, config, checkpoint directory) of a pre-training checkpoint of any engine and model family
    (sharded ones consolidated)."""
    from .models import build_model
    from .parallel import consolidated_state_dict

    ckpt = checkpoint.intact_checkpoint_dir(path)
    cfg = checkpoint.checkpoint_config(ckpt)
    model = build_model(cfg.model, init_seed=None)
    load_weights(model, consolidated_state_dict(ckpt, cfg.parallel.engine), ckpt)
    return model.to(device).eval(), cfg, ckpt


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (a format that holds nothing but tensors), or a one-line error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def load_pretrained(directory, device: str = "cpu") -> LlamaLax:
    """A model exported in our format (LaX / CoLA LLaMA, or any ViT), ready for inference."""
    from .models import build_model

    directory = Path(directory)
    if not (directory / OUR_FORMAT).is_file():
        raise ValueError(f"{directory} is not a megatron_lax export (a Hugging Face export loads with "
                         f"transformers.LlamaForCausalLM.from_pretrained)")
    model = build_model(load_config(str(directory / "config.yaml")).model, init_seed=None)
    load_weights(model, read_safetensors(directory / "model.safetensors"), directory)
    return model.to(device).eval()


def load_weights(model: torch.nn.Module, state: dict, where) -> None:
    """load_state_dict (strict), with a checkpoint that does not fit its config as a one-line error."""
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        problems = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise ValueError(f"{where}: the weights do not fit its config.yaml ({problems[0] if problems else e})") \
            from None


# --- bases and fine-tuned runs ----------------------------------------------------------------------------

def base_kind(spec: str) -> str:
    """`huggingface`, `export` (ours) or `checkpoint`; a path that is none of them raises ValueError."""
    path = Path(spec)
    if not spec:
        raise ValueError("finetune.base is not set (a run or checkpoint directory, an export, or a Hugging Face "
                         "LlamaForCausalLM directory)")
    if not path.is_dir():
        raise ValueError(f"finetune.base {spec}: no such directory")
    if (path / "config.json").is_file():
        return "huggingface"
    return "export" if (path / OUR_FORMAT).is_file() else "checkpoint"


def base_tokenizer(spec: str) -> str:
    """Where the base's tokenizer lives: beside a Hugging Face model, in an export's tokenizer/, or
    the one a run was trained with."""
    kind, path = base_kind(spec), Path(spec)
    if kind == "checkpoint":
        return checkpoint.checkpoint_config(path).data.tokenizer
    if kind == "huggingface" and not (path / "tokenizer").is_dir():
        return str(path)
    return str(path / "tokenizer")


def load_base(spec: str, dtype: torch.dtype = torch.float32) -> LlamaLax:
    """The base as a dense LlamaLax on the CPU (frozen weights in `dtype`). SVD models without LaX are
    merged (W = B A); CoLA and LaX models are refused: their projections are not single weight matrices."""
    kind = base_kind(spec)
    if kind == "huggingface":
        return load_hf_llama(spec, dtype)
    if kind == "checkpoint" and is_finetune_run(spec):
        raise ValueError(f"finetune.base {spec} is a fine-tuning run; export it with --merge (plain LoRA) and "
                         f"use the export as the base")
    model = load_pretrained(spec) if kind == "export" else load_checkpoint_model(Path(spec))[0]
    cfg = model.cfg
    if cfg.method != "dense":
        if not mergeable(cfg):
            what = "a CoLA" if cfg.method == "cola" else "a LaX"
            raise ValueError(f"finetune.base {spec} is {what} model: LoRA needs plain linear projections (only dense "
                             f"and SVD-without-LaX bases can be fine-tuned)")
        dense_cfg = dataclasses.replace(cfg, method="dense", rank=0, attn_rank=None, mlp_rank=None)
        dense = LlamaLax(dense_cfg, init_seed=None)
        dense.load_state_dict(state_dict_from_hf(hf_state_dict(model), cfg.n_layers))
        model = dense
    return model.to(dtype).eval()


def base_fingerprint(named_tensors) -> str:
    """A fingerprint of a base's weights: each tensor's name, shape and a strided sample of up to 4,096
    of its values, rounded to bf16 (so a base loaded in bf16 or fp32 has one fingerprint). Cheap for
    a 7B model, and different for any other trained base."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].to(torch.bfloat16).float().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def check_base(cfg: Config, base: LlamaLax, where) -> None:
    """Refuses a base whose weights are not those the run was trained on."""
    expected = cfg.finetune.base_fingerprint
    found = base_fingerprint(base.named_parameters())
    if expected and found != expected:
        raise checkpoint.CheckpointError(f"{where}: finetune.base {cfg.finetune.base} is not the base this run was "
                                         f"trained on (weights fingerprint {found}, the run's {expected})")


def load_finetuned(path, device: torch.device = torch.device("cpu")):
    """(model, config, checkpoint directory) of a fine-tuning run or checkpoint of any engine. A
    LoRA checkpoint holds the adapters only: the frozen weights come from the run's base, which
    must be the one it was trained on (fingerprint). Full fine-tuning checkpoints hold everything."""
    from .lora import apply_lora
    from .parallel import consolidated_state_dict

    ckpt = checkpoint.intact_checkpoint_dir(path)
    cfg = checkpoint.checkpoint_config(ckpt)
    state = {k: v.float() for k, v in consolidated_state_dict(ckpt).items()}
    adapt = (lambda m: m) if cfg.finetune.full else (lambda m: apply_lora(m, cfg.lora, seed=cfg.train.seed))
    with torch.device("meta"):
        names = adapt(LlamaLax(cfg.model, init_seed=None)).state_dict().keys()
    if all(k in state for k in names):
        model = adapt(LlamaLax(cfg.model, init_seed=None))
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


def is_finetune_run(path) -> bool:
    return bool(checkpoint.checkpoint_config(Path(path)).finetune.base)


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


def load_lax_lora(directory, base: str | None = None, device: str = "cpu") -> LlamaLax:
    """A LaX-LoRA export on its base (the one the run used unless `base` names another copy)."""
    from .lora import apply_lora

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
    from .lora import adapter_value, apply_lora
    from .models.llama import assign_parameters, init_rules
    from .parallel import ModelRecipe

    directory = Path(cfg.finetune.base)
    hf, model_cfg = read_hf_config(directory)
    weights, names = HFWeights(directory), hf_name_map(model_cfg.n_layers)
    tied = bool(hf.get("tie_word_embeddings", False))
    check_hf_names(weights.keys(), names, model_cfg.n_layers, tied)
    full = cfg.finetune.full

    def build():
        model = LlamaLax(model_cfg, init_seed=None)
        return model.requires_grad_(True) if full else apply_lora(model, cfg.lora, seed=cfg.train.seed, init=False)

    def initialize(model):
        rules = init_rules(model, model_cfg)
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


def load_any(path) -> tuple[LlamaLax, str]:
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
