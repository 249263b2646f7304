"""Export a checkpoint (any engine) for use outside this codebase:

    python -m megatron_lax.export --checkpoint DIR --output DIR

Dense models, and SVD models without LaX (their factors merged, W = B A), become a Hugging Face
`LlamaForCausalLM` directory (config.json + model.safetensors) that `transformers` loads with
`from_pretrained`. LaX and CoLA models cannot be merged into plain linears; they are written in our
own format (config.yaml + model.safetensors) and loaded with `megatron_lax.load_pretrained(DIR)`.
The tokenizer the run used is copied alongside when it is a local directory or file.

Fine-tuning runs (python -m megatron_lax.finetune): plain LoRA adapters are written in PEFT's format
(adapter_config.json + adapter_model.safetensors, for `peft.PeftModel.from_pretrained` on the Hugging
Face export of the base, which goes to DIR/base unless the base already is a Hugging Face directory);
with --merge they are folded into the base weights and written as a Hugging Face model. LaX-LoRA
adapters read the previous block's latent, so no weight matrix holds them: they are written in our
format (adapters only, config.yaml naming the base) and loaded with `load_lax_lora(DIR)`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from . import checkpoint
from .config import ModelConfig, dump_yaml, load_config
from .evaluate import load_model
from .models.llama import LlamaLax

HF_NAMES = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
            "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
            "mlp.down": "mlp.down_proj", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
OUR_FORMAT = "megatron_lax.json"
LAX_LORA_FORMAT = "megatron_lax_lora.json"


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


def hf_config(cfg: ModelConfig) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads, "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32"}


# --- Hugging Face LLaMA -> our dense model (the inverse of hf_state_dict / hf_config) -----------------

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


def read_hf_weights(directory: Path) -> dict:
    """Every tensor of model.safetensors / pytorch_model.bin, or of their sharded index."""
    from safetensors.torch import load_file
    load = {".safetensors": lambda p: load_file(str(p)),
            ".bin": lambda p: torch.load(p, map_location="cpu", weights_only=True)}
    for stem, suffix in (("model", ".safetensors"), ("pytorch_model", ".bin")):
        if (directory / f"{stem}{suffix}").is_file():
            return load[suffix](directory / f"{stem}{suffix}")
        index = directory / f"{stem}{suffix}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError):
                raise ValueError(f"{index}: not a valid weight index") from None
            return {k: v for shard in shards for k, v in load[suffix](directory / shard).items()}
    raise ValueError(f"{directory}: no model.safetensors, pytorch_model.bin or sharded index")


def load_hf_llama(directory) -> LlamaLax:
    """A local Hugging Face LlamaForCausalLM directory as our dense LlamaLax (fp32, CPU)."""
    directory = Path(directory)
    try:
        hf = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{directory / 'config.json'}: cannot read it ({e})") from None
    cfg = model_config_from_hf(hf, str(directory))
    try:
        weights = read_hf_weights(directory)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{directory}: cannot read the weights ({str(e).splitlines()[0]})") from None
    model = LlamaLax(cfg, init_seed=None)
    state = state_dict_from_hf(weights, cfg.n_layers, tied=bool(hf.get("tie_word_embeddings", False)))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{directory}: the weights do not fit config.json ({str(e).splitlines()[-1].strip()})") from None
    return model.eval()


def copy_tokenizer(spec: str, output: Path) -> None:
    source = Path(spec)
    if source.is_dir():
        shutil.copytree(source, output / "tokenizer", dirs_exist_ok=True)
    elif source.is_file():
        (output / "tokenizer").mkdir(exist_ok=True)
        shutil.copy(source, output / "tokenizer" / source.name)


def export(checkpoint_dir: Path, output: Path) -> str:
    from safetensors.torch import save_file

    model, cfg, _ = load_model(checkpoint_dir, torch.device("cpu"))
    output.mkdir(parents=True, exist_ok=True)
    if mergeable(cfg.model):
        write_huggingface(model, cfg.model, output)
        kind = "huggingface"
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(output / "model.safetensors"))
        (output / "config.yaml").write_text(dump_yaml(cfg))
        (output / OUR_FORMAT).write_text(json.dumps({"format": "megatron_lax", "version": 1}))
        kind = "megatron_lax"
    copy_tokenizer(cfg.data.tokenizer, output)
    return kind


# --- fine-tuned adapters -------------------------------------------------------------------------------

def peft_state_dict(model: LlamaLax) -> dict[str, torch.Tensor]:
    """Plain LoRA adapters under the names PEFT writes for LlamaForCausalLM."""
    from .lora import LoraLinear
    out = {}
    for i, block in enumerate(model.layers):
        for ours, theirs in HF_NAMES.items():
            module = block.get_submodule(ours)
            if isinstance(module, LoraLinear):
                at = f"base_model.model.model.layers.{i}.{theirs}"
                out[f"{at}.lora_A.weight"] = module.adapter.A.weight
                out[f"{at}.lora_B.weight"] = module.adapter.B.weight
    return {k: v.detach().contiguous().float() for k, v in out.items()}


def peft_config(cfg, base_path: str) -> dict:
    targets = [HF_NAMES[f"{'attn' if t in ('q', 'k', 'v', 'o') else 'mlp'}.{t}"].split(".")[1] for t in cfg.lora.targets]
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path, "r": cfg.lora.rank,
            "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout, "target_modules": targets,
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False}


def write_huggingface(model: LlamaLax, cfg: ModelConfig, output: Path) -> None:
    from safetensors.torch import save_file
    output.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(model), str(output / "model.safetensors"), metadata={"format": "pt"})
    (output / "config.json").write_text(json.dumps(hf_config(cfg), indent=1))


def export_finetuned(checkpoint_dir: Path, output: Path, merge: bool = False) -> str:
    """Writes a fine-tuning run's adapters (see the module docstring); returns the format written."""
    from safetensors.torch import save_file

    from .finetune import base_kind, load_finetuned
    from .lora import adapter_state_dict, merge_lora, strip_lora, uses_lax

    model, cfg, _ = load_finetuned(checkpoint_dir)
    output.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(cfg.data.tokenizer, output)
    if merge:
        write_huggingface(merge_lora(model), cfg.model, output)
        return "huggingface (merged)"
    if uses_lax(model):
        save_file({k: v.contiguous() for k, v in adapter_state_dict(model.state_dict()).items()},
                  str(output / "adapter_model.safetensors"))
        (output / "config.yaml").write_text(dump_yaml(cfg))
        (output / LAX_LORA_FORMAT).write_text(json.dumps({"format": "megatron_lax_lora", "version": 1}))
        return "megatron_lax LaX-LoRA"
    save_file(peft_state_dict(model), str(output / "adapter_model.safetensors"), metadata={"format": "pt"})
    base_path = cfg.finetune.base
    if base_kind(base_path) != "huggingface":
        base_path = str(output / "base")
        write_huggingface(strip_lora(model), cfg.model, Path(base_path))
    (output / "adapter_config.json").write_text(json.dumps(peft_config(cfg, base_path), indent=1))
    return "peft"


def load_lax_lora(directory, base: str | None = None, device: str = "cpu") -> LlamaLax:
    """A LaX-LoRA export on its base (the one the run used unless `base` names another copy)."""
    from safetensors.torch import load_file

    from .finetune import load_base
    from .lora import apply_lora

    directory = Path(directory)
    if not (directory / LAX_LORA_FORMAT).is_file():
        raise ValueError(f"{directory} is not a LaX-LoRA export")
    cfg = load_config(str(directory / "config.yaml"))
    model = apply_lora(load_base(base or cfg.finetune.base), cfg.lora)
    adapters = load_file(str(directory / "adapter_model.safetensors"))
    missing, unexpected = model.load_state_dict(adapters, strict=False)
    missing = [k for k in missing if ".adapter." in k]
    if missing or unexpected:
        raise ValueError(f"{directory}: the adapters do not fit the base (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    return model.to(device).eval()


def load_pretrained(directory, device: str = "cpu") -> LlamaLax:
    """A model exported in our format (LaX / CoLA), ready for inference."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / OUR_FORMAT).is_file():
        raise ValueError(f"{directory} is not a megatron_lax export (a Hugging Face export loads with "
                         f"transformers.LlamaForCausalLM.from_pretrained)")
    model = LlamaLax(load_config(str(directory / "config.yaml")).model)
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model.to(device).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_lax.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint or run directory")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--merge", action="store_true", help="fine-tuning runs: fold plain LoRA into the base weights")
    args = parser.parse_args(argv)
    try:
        from .finetune import is_finetune_run
        if is_finetune_run(args.checkpoint):
            kind = export_finetuned(args.checkpoint, args.output, args.merge)
        elif args.merge:
            raise ValueError("--merge applies to fine-tuning runs only")
        else:
            kind = export(args.checkpoint, args.output)
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote a {kind} export to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
