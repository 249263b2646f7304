"""train.activation_checkpointing none | block | lowrank: the same losses and gradients bit for bit
(fp32, eager), what low-rank recompute keeps (the latents, not the partial contractions of a tensor
train), and the old true/false spellings from YAML, the command line and an old run's config.yaml."""
from __future__ import annotations

import pytest
import torch

from conftest import REPO, TINY
from megatron_lax.config import ConfigError, load_config
from megatron_lax.models.llama import LlamaLax, token_nll
from megatron_lax.models.vit import ViTLax
from megatron_lax.parallel import apply_activation_checkpointing
from megatron_lax.training.introspection import block_activation_bytes

LLAMA = {**TINY, "model.vocab_size": "128"}
VARIANTS = [("llama_tiny", {"model.method": "cola", "model.lax_gate": "dense"}),
            ("llama_tiny", {"model.method": "svd", "model.lax_gate": "tensor"}),
            ("vit_micro", {"model.method": "tt", "model.lax_gate": "tensor", "model.lax_intra_modules": "fc1",
                           "model.n_layers": "2", "model.num_classes": "10", "model.in_channels": "3"})]


def loss_and_grads(preset, overrides, mode):
    cfg = load_config(preset, {**(LLAMA if preset.startswith("llama") else {}), **overrides})
    torch.manual_seed(0)
    if cfg.model.arch == "vit":
        model = ViTLax(cfg.model)
        loss = lambda: torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 28, 28)), torch.tensor([1, 2]))
    else:
        model = LlamaLax(cfg.model)
        tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
        loss = lambda: token_nll(model(tokens[:1]), tokens[1:])[0]
    apply_activation_checkpointing(model, mode)
    value = loss()
    value.backward()
    return value.detach(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize("preset,overrides", VARIANTS, ids=["cola-dense", "svd-tensor", "tt-intra"])
def test_every_mode_gives_the_same_loss_and_gradients_bit_for_bit(preset, overrides):
    reference = loss_and_grads(preset, overrides, "none")
    for mode in ("block", "lowrank"):
        loss, grads = loss_and_grads(preset, overrides, mode)
        assert torch.equal(loss, reference[0])
        assert all(torch.equal(a, b) for a, b in zip(grads, reference[1])), mode


def test_lowrank_keeps_the_latents_and_recomputes_the_rest():
    """CoLA + LaX, fp32, per token per block: block mode keeps the input (dim) and the 7 latents handed
    on (rank each); low-rank mode also each projection's A x (rank each); off keeps far more."""
    cfg = load_config("llama_tiny", {**LLAMA, "model.method": "cola", "model.lax_gate": "dense"}).model

    def build(n_layers):
        cfg.n_layers = n_layers
        return LlamaLax(cfg, init_seed=None)

    tokens = lambda batch: torch.zeros(batch, 32, dtype=torch.long)
    d, r = cfg.dim, cfg.rank
    assert block_activation_bytes(build, tokens, 32, "block") == 4 * (d + 7 * r)
    assert block_activation_bytes(build, tokens, 32, "lowrank") == 4 * (d + 14 * r)
    assert block_activation_bytes(build, tokens, 32, "none") > 4 * (d + 14 * r) * 4


def test_without_lax_no_latent_is_handed_on():
    """No LaX: nothing crosses blocks, so a checkpointed block keeps only its input."""
    cfg = load_config("llama_tiny", {**LLAMA, "model.method": "svd"}).model

    def build(n_layers):
        cfg.n_layers = n_layers
        return LlamaLax(cfg, init_seed=None)

    tokens = lambda batch: torch.zeros(batch, 32, dtype=torch.long)
    assert block_activation_bytes(build, tokens, 32, "block") == 4 * cfg.dim


def test_true_and_false_still_mean_block_and_none(tmp_path):
    assert load_config("llama_tiny", {"train.activation_checkpointing": "true"}).train.activation_checkpointing == "block"
    assert load_config("llama_tiny", {"train.activation_checkpointing": "lowrank"}).train.activation_checkpointing \
        == "lowrank"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  activation_checkpointing: true\n")
    assert load_config(str(path)).train.activation_checkpointing == "block"
    old = REPO / "tests" / "data" / "before_tasks" / "lm" / "step_00000002" / "config.yaml"  # written as false
    assert load_config(str(old)).train.activation_checkpointing == "none"
    with pytest.raises(ConfigError, match="train.activation_checkpointing 'sometimes' is unknown"):
        load_config("llama_tiny", {"train.activation_checkpointing": "sometimes"})
