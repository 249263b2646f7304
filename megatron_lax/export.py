"""Export a checkpoint (any engine) for use outside this codebase:

    python -m megatron_lax.export --checkpoint DIR --output DIR

Dense models, and SVD models without LaX (their factors merged, W = B A), become a Hugging Face
`LlamaForCausalLM` directory (config.json + model.safetensors) that `transformers` loads with
`from_pretrained`. LaX and CoLA models cannot be merged into plain linears; they become a transformers
folder with its own modeling file (megatron_lax/hub/), loaded with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`; `--format megatron_lax` writes
our own format instead (config.yaml + model.safetensors, loaded with `megatron_lax.load_pretrained(DIR)`),
as for ViTs, which `evaluate --checkpoint DIR` scores.
The tokenizer the run used is copied alongside when it is a local directory or file: its own files
only (tokenizer.model, the Hugging Face tokenizer files), never a symbolic link.

The export is written under a temporary name beside DIR and renamed into place when complete. DIR
must be new or empty; --force replaces what it holds.

Fine-tuning runs (python -m megatron_lax.finetune): plain LoRA adapters are written in PEFT's format
(adapter_config.json + adapter_model.safetensors, for `peft.PeftModel.from_pretrained` on the Hugging
Face export of the base, which goes to DIR/base unless the base already is a Hugging Face directory);
with --merge they are folded into the base weights and written as a Hugging Face model. LaX-LoRA
adapters read the previous block's latent, so no weight matrix holds them: the base and its adapters
are written as one transformers model with its own modeling file (as LaX models are), or with
`--format megatron_lax` in our format (adapters only, config.yaml naming the base and its weights'
fingerprint), loaded with `load_lax_lora(DIR)`. A run is exported from its best-validation checkpoint when it kept one
(finetune.keep_best), and never onto a base other than the one it was trained on.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from .data.tokenizer import HF_TOKENIZER_FILES

from .config import ModelConfig, dump_yaml
from .loading.bases import base_kind, is_finetune_run
from .loading.finetuned import load_finetuned, selected_checkpoint
from .loading.huggingface import HF_NAMES, hf_state_dict, mergeable
from .loading.ours import LAX_LORA_FORMAT, OUR_FORMAT, load_checkpoint_model as load_model
from .method.formats import format_of
from .models import family_of
from .parallel import trust
from .training import checkpoint


def hf_config(cfg: ModelConfig) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32"}


# --- where an export is written ------------------------------------------------------------------------

def check_output(output: Path, force: bool) -> None:
    """Refuses, before anything is loaded, an output that holds something (unless forced)."""
    if output.exists() and not force and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"--output {output} is not empty; choose a new directory, or pass --force to replace "
                         f"what it holds")


def check_apart(output: Path, source: Path) -> None:
    """Refuses, --force or not, an output that is, is inside or contains the run (or folder) exported."""
    source = Path(source)
    if (source / checkpoint.MANIFEST).is_file() and source.parent.name in ("checkpoints", "best"):
        source = source.parent.parent  # a checkpoint directory: its run
    elif source.name in ("checkpoints", "best") and not (source / checkpoint.MANIFEST).is_file():
        source = source.parent  # a run's checkpoints/ folder
    theirs, ours = source.resolve(), Path(output).resolve()
    if ours == theirs or ours.is_relative_to(theirs) or theirs.is_relative_to(ours):
        raise ValueError(f"--output {output} overlaps {source}, the run being exported (it is, is inside or "
                         f"contains it); choose a directory outside it")


@contextlib.contextmanager
def written_into(output: Path):
    """Yields a staging directory beside `output`; once the block completes, it becomes `output` (what
    output held before is removed only then). On a failure the staging directory is removed and
    `output` is left as it was."""
    staging = output.with_name(f".{output.name}.incomplete")
    shutil.rmtree(staging, ignore_errors=True)  # an earlier export's, interrupted
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replaced = output.with_name(f".{output.name}.replaced")
    if output.is_dir() and not output.is_symlink():
        os.replace(output, replaced)
    elif output.exists() or output.is_symlink():
        output.unlink()
    os.replace(staging, output)
    shutil.rmtree(replaced, ignore_errors=True)


# The files a tokenizer consists of: ours (tokenizer.train writes tokenizer.model and training.json)
# and Hugging Face's. Nothing else in the directory is copied.
TOKENIZER_FILES = ("tokenizer.model", "training.json") + HF_TOKENIZER_FILES


def copy_tokenizer(spec: str, output: Path) -> None:
    """Copies the run's tokenizer into output/tokenizer when it is local: its own files, never a file
    that is a symbolic link (a skipped one is printed)."""
    source = Path(spec)
    if source.is_file():
        files = [source]
        if source.name not in TOKENIZER_FILES:
            print(f"note: not copying {source} into the export: not a tokenizer file ({', '.join(TOKENIZER_FILES)})",
                  file=sys.stderr)
            return
    elif source.is_dir():
        files = [source / name for name in TOKENIZER_FILES if (source / name).is_file() or (source / name).is_symlink()]
    else:
        print(f"note: the tokenizer {spec} is not a local file or directory; the export has none", file=sys.stderr)
        return
    for path in files:
        if path.is_symlink() and path != source:
            print(f"note: not copying {path} into the export: a symbolic link", file=sys.stderr)
            continue
        (output / "tokenizer").mkdir(exist_ok=True)
        shutil.copyfile(path, output / "tokenizer" / path.name)


FORMATS = ("transformers", "megatron_lax")  # --format: how a model that is not a plain LLaMA is written


def export(checkpoint_dir: Path, output: Path, force: bool = False, fmt: str = "transformers",
           max_shard_size: str = "5GB") -> str:
    from safetensors.torch import save_file

    check_output(output, force)
    model, cfg, ckpt = load_model(checkpoint_dir, torch.device("cpu"))
    with written_into(output) as staging:
        if family_of(cfg.model).exports_to_huggingface and mergeable(cfg.model):
            write_huggingface(model, cfg.model, staging)
            kind = "huggingface"
        elif family_of(cfg.model).transformers_export and format_of(cfg.model).export == "transformers" \
                and fmt == "transformers":
            from .hub import write_export
            return write_export(model, cfg, trainer_state(ckpt), staging, max_shard_size)
        else:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(staging / "model.safetensors"))
            (staging / "config.yaml").write_text(dump_yaml(cfg))
            step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
            (staging / OUR_FORMAT).write_text(json.dumps({"format": "megatron_lax", "version": 1, "step": step}))
            kind = "megatron_lax"
        copy_tokenizer(cfg.data.tokenizer, staging)
    return kind


# --- fine-tuned adapters -------------------------------------------------------------------------------

def peft_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Plain LoRA adapters under the names PEFT writes for LlamaForCausalLM."""
    from .models.lora import LoraLinear
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


def write_huggingface(model: torch.nn.Module, cfg: ModelConfig, output: Path) -> None:
    from safetensors.torch import save_file
    output.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(model), str(output / "model.safetensors"), metadata={"format": "pt"})
    (output / "config.json").write_text(json.dumps(hf_config(cfg), indent=1))


def trainer_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


def export_finetuned(checkpoint_dir: Path, output: Path, merge: bool = False, force: bool = False,
                     fmt: str = "transformers", max_shard_size: str = "5GB") -> str:
    """Writes a fine-tuning run's adapters (see the module docstring); returns the format written."""
    from .models.lora import merge_lora

    check_output(output, force)
    from .models.lora import uses_lax
    model, cfg, ckpt = load_finetuned(selected_checkpoint(checkpoint_dir))
    if merge:
        model = merge_lora(model)  # refuses LaX-LoRA before anything is written
    elif uses_lax(model) and fmt == "transformers":
        from .hub import write_transformers
        with written_into(output) as staging:
            write_transformers(model, cfg, trainer_state(ckpt), staging, lora=True, max_shard_size=max_shard_size)
        return "transformers (remote code, base and LaX-LoRA adapters)"
    with written_into(output) as staging:
        copy_tokenizer(cfg.data.tokenizer, staging)
        return write_adapters(model, cfg, staging, output, merge)


def write_adapters(model, cfg, staging: Path, output: Path, merge: bool) -> str:
    """Writes into `staging` what will be `output` (files that name a path name the final one)."""
    from safetensors.torch import save_file

    from .models.lora import adapter_state_dict, strip_lora, uses_lax
    if merge:
        write_huggingface(model, cfg.model, staging)
        return "huggingface (merged)"
    if uses_lax(model):
        save_file({k: v.contiguous() for k, v in adapter_state_dict(model.state_dict()).items()},
                  str(staging / "adapter_model.safetensors"))
        (staging / "config.yaml").write_text(dump_yaml(cfg))
        (staging / LAX_LORA_FORMAT).write_text(json.dumps({"format": "megatron_lax_lora", "version": 1}))
        return "megatron_lax LaX-LoRA"
    save_file(peft_state_dict(model), str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
    base_path = cfg.finetune.base
    if base_kind(base_path) != "huggingface":
        base_path = str(output / "base")
        write_huggingface(strip_lora(model), cfg.model, staging / "base")
    (staging / "adapter_config.json").write_text(json.dumps(peft_config(cfg, base_path), indent=1))
    return "peft"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_lax.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint or run directory")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--merge", action="store_true", help="fine-tuning runs: fold plain LoRA into the base weights")
    parser.add_argument("--force", action="store_true", help="replace what --output holds")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="transformers",
                        help="LaX / CoLA / LaX-LoRA LLaMAs: a transformers folder with its modeling file (default) "
                             "or our own format")
    parser.add_argument("--max-shard-size", default="5GB", help="transformers folders: weights shard above this size")
    parser.add_argument("--trust-checkpoint", action="store_true", help="unpickle checkpoint files that need it (DeepSpeed's) from this source; only for files you trust")
    args = parser.parse_args(argv)
    try:
        check_apart(args.output, args.checkpoint)
        with trust.trusting(everything=args.trust_checkpoint):
            if is_finetune_run(args.checkpoint):
                kind = export_finetuned(args.checkpoint, args.output, args.merge, args.force, args.fmt,
                                        args.max_shard_size)
            elif args.merge:
                raise ValueError("--merge applies to fine-tuning runs only")
            else:
                kind = export(args.checkpoint, args.output, args.force, args.fmt, args.max_shard_size)
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as e:  # a full disk, a permission: nothing was replaced
        reason = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror else str(e)
        print(f"error: could not write the export to {args.output} ({reason}); it is as it was", file=sys.stderr)
        return 2
    print(f"wrote a {kind} export to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
