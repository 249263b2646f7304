"""What training does inside LaX, and how fast it goes: linear-gate values per projection and block
(the paper's Table 19 view), the RMS of each crossing latent G(z_{i-1}) against its own A_i x_i, peak
memory, and model FLOPs utilisation."""
from __future__ import annotations

import contextlib
import resource
import weakref
import time

import torch
import torch.nn as nn
import torch.utils._python_dispatch

from ..method.lowrank import LatentLinear, LinearGate

# Dense peak FLOP/s (no sparsity) of common accelerators, matched by substring of the device name, in
# table order (so "H100 NVL" before "H100"): BF16 tensor cores, TF32 tensor cores (fp32 matmuls with
# train.tf32), and plain FP32 (fp32 without TF32). The vendors' data sheets; sparsity figures halved.
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H800 PCIe": 756e12, "H800": 989e12,
    "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L4": 121e12,
    "A10G": 125e12, "A6000": 155e12, "V100": 125e12, "4090": 165e12, "3090": 71e12, "MI300X": 1307e12,
    "MI250X": 383e12,
}
PEAK_TF32_FLOPS = {
    "H200": 494e12, "H100 PCIe": 378e12, "H100 NVL": 418e12, "H100": 494e12, "H800 PCIe": 378e12, "H800": 494e12,
    "GH200": 494e12, "B200": 1100e12, "A100": 156e12, "A800": 156e12, "L40S": 183e12, "L4": 60e12,
    "A10G": 62e12, "A6000": 77e12, "V100": 15.7e12, "4090": 82e12, "3090": 35e12, "MI300X": 653e12,
    "MI250X": 95.7e12,  # V100 and MI250X have no TF32: their FP32 (MI250X: FP32 matrix) peak
}
PEAK_FP32_FLOPS = {
    "H200": 67e12, "H100 PCIe": 51e12, "H100 NVL": 60e12, "H100": 67e12, "H800 PCIe": 51e12, "H800": 67e12,
    "GH200": 67e12, "B200": 80e12, "A100": 19.5e12, "A800": 19.5e12, "L40S": 91.6e12, "L4": 30.3e12,
    "A10G": 31.2e12, "A6000": 38.7e12, "V100": 15.7e12, "4090": 82.6e12, "3090": 35.6e12, "MI300X": 163e12,
    "MI250X": 47.9e12,
}


def peak_table(precision: str, tf32: bool) -> dict[str, float]:
    """The peaks a run in this precision is measured against: BF16 for bf16-*, TF32 or FP32 for fp32."""
    if precision.startswith("bf16"):
        return PEAK_BF16_FLOPS
    return PEAK_TF32_FLOPS if tf32 else PEAK_FP32_FLOPS


def full_value(p: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value whatever shards it (FSDP2 DTensor, DeepSpeed ZeRO-3)."""
    if hasattr(p, "full_tensor"):
        return p.full_tensor()
    if hasattr(p, "ds_id"):
        import deepspeed
        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().clone()
    return p.detach()


def gate_values(model: nn.Module) -> dict[str, float]:
    return {f"lax_gate/{name}/{index}": float(full_value(module.lax_gate.beta).float().reshape(-1)[0])
            for name, index, module in crossing_projections(model) if isinstance(module.lax_gate, LinearGate)}


def lowrank_projections(model: nn.Module):
    """(projection name, block index, module) for every latent projection of every block (a family's
    `layers`), LoRA adapters included: each knows its projection's name (LatentLinear.projection)."""
    for index, block in enumerate(model.layers):
        for module in block.modules():
            if isinstance(module, LatentLinear):
                yield module.projection, index, module


def crossing_projections(model: nn.Module):
    """(projection name, block index, module) for every projection that receives a latent."""
    return ((name, index, m) for name, index, m in lowrank_projections(model) if m.lax_gate is not None)


@torch.no_grad()
def latent_rms(model: nn.Module, run_forward) -> dict[str, float]:
    """Runs `run_forward()` once with hooks that record, for every low-rank projection of block i:
    `own` RMS(A_i x_i), `crossing` RMS(G(z_{i-1})) where LaX crosses, `latent` RMS of what B_i
    multiplies (after the sum, LayerNorm and activation) and `out` RMS(B_i z_i). With LaX the
    LayerNorm fixes `latent` near 1 whatever A's scale, so B's initial scale alone sets `out`.

    The forward runs eagerly even where train.compile compiled the blocks (the hooks would be guarded
    on, one recompile per block), and the values reach the host once, after it."""
    stats, handles = {}, []

    rms = lambda value: value.float().pow(2).mean().sqrt()  # left on the device: read once, at the end

    def crossing(at):
        def hook(gate, inputs, output):
            stats[f"{at}/crossing"] = rms(output)
        return hook

    def projection(at):
        def hook(module, inputs, output):  # any LatentLinear: h and z recomputed from its encode and cross
            x, prev = (inputs + (None,))[:2]
            h = module.encode(x)
            stats.update({f"{at}/own": rms(h), f"{at}/latent": rms(module.cross(h, prev)), f"{at}/out": rms(output[0])})
        return hook

    for name, index, module in lowrank_projections(model):
        at = f"lax_rms/{name}/{index}"
        if module.lax_gate is not None:
            handles.append(module.lax_gate.register_forward_hook(crossing(at)))
        handles.append(module.register_forward_hook(projection(at), prepend=True))  # before a ZeRO-3 release
    try:
        with torch.compiler.set_stance("force_eager"):
            run_forward()
    finally:
        for handle in handles:
            handle.remove()
    values = torch.stack(list(stats.values())).tolist() if stats else []
    return dict(zip(stats, values))


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def measure_matmul_flops(device: torch.device, size: int = 1024, repeats: int = 5) -> float:
    """Best observed FLOP/s of a square fp32 matmul: the CPU's practical peak for MFU."""
    # its own generator: drawing from the global one would shift a resumed run's dropout masks
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(size, size, device=device, generator=generator) for _ in range(2))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def gpu_peak_flops(name: str, precision: str = "bf16-mixed", tf32: bool = False) -> float:
    """The dense peak of a GPU by its name in this precision; 0.0 for a GPU not in the tables."""
    return next((value for key, value in peak_table(precision, tf32).items() if key in name), 0.0)


def peak_flops(device: torch.device, configured: float = 0.0, precision: str = "bf16-mixed",
               tf32: bool = False) -> float:
    """Per-device peak FLOP/s for MFU: `configured` if given; a known GPU's in the precision's table;
    measured on a CPU; 0.0 for an unknown GPU (MFU is then not reported unless logging.peak_flops is set)."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), precision, tf32)
    return measure_matmul_flops(device)


HOST_READS = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def counting_host_reads():
    """Counts, while inside, the calls that read a tensor's value back on the host (HOST_READS): each
    waits for the accelerator to finish its queued work. Yields a dict whose "count" grows; on a CPU
    it shows where a GPU run would wait (torch.cuda.set_sync_debug_mode needs a GPU)."""
    counter = {"count": 0}
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(original):
        def read(self, *args, **kwargs):
            counter["count"] += 1
            return original(self, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(original))
    try:
        yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class RetainedActivations(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the activation memory a forward pass leaves for the backward: the bytes of every storage
    that an operation inside the `with` block created and that is still alive when the block ends
    (saved for backward, kept by activation checkpointing as a block's inputs, or cached by its
    selective policy), parameters excluded. Works on the meta device, so a model of any size can be
    counted on a CPU. `saved_tensor_bytes` is the narrower count of saved-tensor hooks: what autograd
    itself packs for backward outside checkpointed regions."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.excluded = {p.untyped_storage()._cdata for p in model.parameters()}
        self.outputs: list = []
        self.saved: dict[int, torch.Tensor] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in self.excluded:
            self.saved[key] = t
        return t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.outputs.append(weakref.ref(t))
        return out

    def __enter__(self):
        self.hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.hooks.__exit__(*exc)

    def retained_bytes(self, *excluding: torch.Tensor) -> int:
        """Bytes of the live storages created inside the block, less those of `excluding` (the outputs)."""
        skip = self.excluded | {t.untyped_storage()._cdata for t in excluding}
        live = {}
        for ref in self.outputs:
            t = ref()
            if t is not None and t.untyped_storage()._cdata not in skip:
                live[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return sum(live.values())

    def saved_tensor_bytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.saved.values())


def block_activation_bytes(build, inputs, tokens_per_sample: int, mode: str, dtype=torch.float32) -> float:
    """Measured bytes per token that one block keeps for backward: `build(n_layers)` returns a model
    (with blocks in `model.layers`) and `inputs(batch)` its input; the count is the difference between
    3 and 2 blocks and between 2 samples and 1, so the embedding, the head and anything that does not
    grow with the tokens cancel out. Runs under FakeTensorMode: no memory is allocated, any size fits."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..parallel.recompute import apply_activation_checkpointing

    def retained(n_layers, batch):
        default = torch.get_default_dtype()
        with FakeTensorMode():
            torch.set_default_dtype(dtype)
            try:
                model = build(n_layers)
            finally:
                torch.set_default_dtype(default)
            apply_activation_checkpointing(model, mode)
            x = inputs(batch)
            with RetainedActivations(model) as counter:
                out = model(x)
            return counter.retained_bytes(out)

    per_block = lambda batch: retained(3, batch) - retained(2, batch)
    return (per_block(2) - per_block(1)) / tokens_per_sample
