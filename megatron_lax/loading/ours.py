"""Our own files: a pre-training checkpoint of any engine and model family, and our exports."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import load_config
from ..models import build_model
from ..models.llama import LlamaLax
from ..parallel import consolidated_state_dict
from ..training import checkpoint

OUR_FORMAT = "megatron_lax.json"


LAX_LORA_FORMAT = "megatron_lax_lora.json"


def load_checkpoint_model(path: Path, device: torch.device = torch.device("cpu")):
    """(model, config, checkpoint directory) of a pre-training checkpoint of any engine and model family
    (sharded ones consolidated)."""

    ckpt = checkpoint.resolve_checkpoint_dir(path)
    cfg = checkpoint.checkpoint_config(ckpt)
    model = build_model(cfg.model, init_seed=None)
    state = consolidated_state_dict(ckpt, cfg.parallel.engine)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(device).eval(), cfg, ckpt


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
