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
format (adapters only, config.yaml naming the base and its weights' fingerprint) and loaded with
`load_lax_lora(DIR)`. A run is exported from its best-validation checkpoint when it kept one
(finetune.keep_best), and never onto a base other than the one it was trained on.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from . import checkpoint, trust
from .config import ModelConfig, dump_yaml
from .model_io import (HF_NAMES, LAX_LORA_FORMAT, OUR_FORMAT, base_kind, hf_state_dict, is_finetune_run,  # noqa: F401
                       load_checkpoint_model as load_model, load_finetuned, load_hf_llama, load_lax_lora,
                       load_pretrained, mergeable, model_config_from_hf, read_hf_weights, selected_checkpoint,
                       state_dict_from_hf)
from .models.llama import LlamaLax


def hf_config(cfg: ModelConfig) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32"}


# --- Hugging Face LLaMA -> our dense model (the inverse of hf_state_dict / hf_config) -----------------

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

    from .lora import adapter_state_dict, merge_lora, strip_lora, uses_lax

    model, cfg, _ = load_finetuned(selected_checkpoint(checkpoint_dir))
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_lax.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint or run directory")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--merge", action="store_true", help="fine-tuning runs: fold plain LoRA into the base weights")
    parser.add_argument("--trust-checkpoint", action="store_true", help="unpickle checkpoint files that need it (DeepSpeed's) from this source; only for files you trust")
    args = parser.parse_args(argv)
    try:
        with trust.trusting(everything=args.trust_checkpoint):
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
