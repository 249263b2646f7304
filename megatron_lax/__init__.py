"""megatron-lax: low-rank LLaMA pre-training with LaX (Latent Crossing)."""


def load_pretrained(directory, device: str = "cpu"):
    """A LaX / CoLA model exported with `python -m megatron_lax.export`, ready for inference."""
    from .loading.ours import load_pretrained as load
    return load(directory, device)


__all__ = ["load_pretrained"]
