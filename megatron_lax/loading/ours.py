"""Our own files: a pre-training checkpoint of any engine and model family, and our exports."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import load_config
from ..models import build_model
from ..parallel import consolidated_state_dict
from ..training import checkpoint

OUR_FORMAT = "megatron_lax.json"


LAX_LORA_FORMAT = "megatron_lax_lora.json"


def load_checkpoint_model(path: Path, device: torch.device = torch.device("cpu")):
    """(model, config, checkpoint directory) of a pre-training checkpoint of any engine and model family
    (sharded ones consolidated)."""

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


def load_pretrained(directory, device: str = "cpu") -> torch.nn.Module:
    """A model exported in our format (LaX / CoLA LLaMA, or any ViT), ready for inference."""
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
