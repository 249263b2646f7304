"""Hugging Face LLaMA directories <-> our dense LLaMA: config and weight-name conversion, reading
.safetensors (and, for a trusted directory, .bin) weights tensor by tensor."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ModelConfig
from ..method.formats import format_of
from ..models import family_of
from ..parallel import trust

HF_NAMES = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
            "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
            "mlp.down": "mlp.down_proj", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


def mergeable(cfg: ModelConfig) -> bool:
    """Whether every projection is one weight matrix (the format says: dense W, or SVD's B A)."""
    return format_of(cfg).mergeable(cfg)


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
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


def read_hf_config(directory) -> tuple[dict, ModelConfig]:
    directory = Path(directory)
    try:
        hf = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{directory / 'config.json'}: cannot read it ({e})") from None
    return hf, model_config_from_hf(hf, str(directory))


def load_hf_llama(directory, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
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
            model = family_of(cfg).build(cfg, init_seed=None)
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
