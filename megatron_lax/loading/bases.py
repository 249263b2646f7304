"""The base of a fine-tuning run: what kind of directory it is, its tokenizer, the dense LLaMA it
loads as, and the fingerprint of its weights that fine-tuning records (resume, evaluation and export
refuse another base)."""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from ..config import Config
from ..method.formats import format_of
from ..models import family_of
from ..training import checkpoint
from .huggingface import hf_state_dict, load_hf_llama, mergeable, state_dict_from_hf
from .ours import OUR_FORMAT, load_checkpoint_model, load_pretrained

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


def is_finetune_run(path) -> bool:
    return bool(checkpoint.checkpoint_config(Path(path)).finetune.base)


def load_base(spec: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
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
    if format_of(cfg).lowrank:
        if not mergeable(cfg):
            what = f"a {format_of(cfg).describe(cfg)}"
            raise ValueError(f"finetune.base {spec} is {what} model: LoRA needs plain linear projections (only dense "
                             f"and SVD-without-LaX bases can be fine-tuned)")
        dense_cfg = dataclasses.replace(cfg, method="dense", rank=0, attn_rank=None, mlp_rank=None)
        dense = family_of(dense_cfg).build(dense_cfg, init_seed=None)
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


def check_base(cfg: Config, base: torch.nn.Module, where) -> None:
    """Refuses a base whose weights are not those the run was trained on."""
    expected = cfg.finetune.base_fingerprint
    found = base_fingerprint(base.named_parameters())
    if expected and found != expected:
        raise checkpoint.CheckpointError(f"{where}: finetune.base {cfg.finetune.base} is not the base this run was "
                                         f"trained on (weights fingerprint {found}, the run's {expected})")
