"""Our transformers exports (megatron_lax/hub/) read back as our own models, as tensors: the folder's
modeling file is never imported or run (its config.yaml and safetensors are all that is read)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import load_config
from ..models import build_model
from .ours import read_safetensors

EXPORT_MARKER = "megatron_lax_export.json"  # {"format": "transformers", "step": ..., "tokens": ...}


def is_transformers_export(path) -> bool:
    return (Path(path) / EXPORT_MARKER).is_file() and (Path(path) / "config.yaml").is_file()


def load_transformers_export(path, device: torch.device = torch.device("cpu")):
    """(model, config, step) of a transformers export of a pre-trained model."""
    path = Path(path)
    cfg = load_config(str(path / "config.yaml"))
    state = {}
    for shard in sorted(path.glob("model*.safetensors")):
        state.update(read_safetensors(shard))
    state = {k if k.startswith("lm_head.") else k.removeprefix("model."): v for k, v in state.items()}
    model = build_model(cfg.model, init_seed=None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: the weights do not fit its config.yaml (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    step = json.loads((path / EXPORT_MARKER).read_text()).get("step")
    return model.to(device).eval(), cfg, step
