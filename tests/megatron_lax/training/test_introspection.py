"""LaX introspection: linear-gate values per projection and block, latent RMS, MFU's peak."""
from __future__ import annotations

import torch

from megatron_lax.config import PROJECTIONS, load_config
from megatron_lax.training.introspection import PEAK_BF16_FLOPS, gate_values, latent_rms, peak_flops
from megatron_lax.models.llama import LlamaLax


def tiny(gate):
    cfg = load_config("llama_tiny", {"model.method": "svd", "model.lax_gate": gate, "model.vocab_size": 64,
                                     "model.dim": 32, "model.n_heads": 2, "model.ffn_dim": 48, "model.rank": 8,
                                     "model.n_layers": 3})
    return LlamaLax(cfg.model)


def test_gate_values_name_every_crossing_projection():
    model = tiny("linear")
    with torch.no_grad():
        model.layers[2].mlp.up.lax_gate.beta.fill_(0.25)
    values = gate_values(model)
    assert set(values) == {f"lax_gate/{p}/{i}" for p in PROJECTIONS for i in (1, 2)}
    assert values["lax_gate/up/2"] == 0.25 and values["lax_gate/q/1"] == 1.0
    assert gate_values(tiny("identity")) == {}


def test_latent_rms_records_crossing_and_own_latents():
    model = tiny("identity")
    x = torch.randint(0, 64, (2, 8))
    stats = latent_rms(model, lambda: model(x))
    # own, latent and out for each of 3 blocks x 7 projections, crossing for blocks 1 and 2
    assert len(stats) == 3 * 3 * len(PROJECTIONS) + 2 * len(PROJECTIONS)
    # With the identity gate the crossing latent of block 1 is block 0's own A x.
    own0 = {}
    handle = model.layers[0].attn.q.A.register_forward_hook(lambda m, i, o: own0.update(rms=o.detach().pow(2).mean().sqrt()))
    model(x)
    handle.remove()
    assert abs(stats["lax_rms/q/1/crossing"] - float(own0["rms"])) < 1e-6
    assert all(not h for h in [m._forward_hooks for m in model.modules()])  # hooks removed


def test_peak_flops_given_or_measured():
    assert peak_flops(torch.device("cpu"), 123.0) == 123.0
    assert peak_flops(torch.device("cpu")) > 1e8
    assert PEAK_BF16_FLOPS["H100"] == 989e12


def test_lax_lora_adapters_are_found_by_the_introspection():
    from megatron_lax.config import LoraConfig
    from megatron_lax.models.lora import apply_lora
    cfg = load_config("llama_tiny", {"model.method": "dense", "model.vocab_size": 64, "model.dim": 32,
                                     "model.n_heads": 2, "model.ffn_dim": 48, "model.n_layers": 3})
    model = apply_lora(LlamaLax(cfg.model), LoraConfig(rank=4, alpha=8, lax_gate="linear", targets=["q", "up"]))
    assert set(gate_values(model)) == {f"lax_gate/{p}/{i}" for p in ("q", "up") for i in (1, 2)}
    stats = latent_rms(model, lambda: model(torch.randint(0, 64, (2, 8))))
    assert "lax_rms/up/2/crossing" in stats and "lax_rms/q/0/own" in stats


def test_peak_flops_by_gpu_name_and_precision():
    from megatron_lax.training.introspection import gpu_peak_flops
    assert gpu_peak_flops("NVIDIA H100 NVL") == 835e12 and gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H800") == 989e12 and gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", "fp32", tf32=True) == 156e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert gpu_peak_flops("Some Future GPU") == 0.0
