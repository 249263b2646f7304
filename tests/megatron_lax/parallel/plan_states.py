"""Builds each engine on a tiny LLaMA (CoLA + LaX), takes one step, and prints per rank, as JSON lines,
the bytes of its real parameters, gradients and optimizer states next to megatron_lax.plan's:
torchrun --nproc_per_node N plan_states.py OUT_DIR ENGINE[:PRECISION] ...  (OUT_DIR/rank{R}.jsonl)
ENGINE: ddp, fsdp or zero1/zero2/zero3 (DeepSpeed)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from megatron_lax import plan  # noqa: E402
from megatron_lax.config import load_config  # noqa: E402
from megatron_lax.method.init import init_weights  # noqa: E402
from megatron_lax.models.llama import LlamaLax, token_nll  # noqa: E402
from megatron_lax.parallel import ModelRecipe, build_engine  # noqa: E402
from megatron_lax.parallel.distributed import barrier, end_process, init_distributed, shutdown  # noqa: E402

# dim 64 rows do not split evenly over 3 ranks, and the vocabulary's 131 rows over neither 2 nor 3
SHAPE = {"model.dim": "64", "model.n_layers": "2", "model.n_heads": "2", "model.ffn_dim": "96", "model.rank": "12",
         "model.vocab_size": "131", "model.method": "cola", "model.lax_gate": "dense", "data.seq_len": "16",
         "train.device": "cpu", "train.micro_batch": "1"}


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def nbytes(tensors) -> int:
    return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)


def adam_states(optimizer) -> list[torch.Tensor]:
    return [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]


def grad_bytes(engine) -> int:
    """The gradients after backward: on the parameters, or in ZeRO's reduced partition."""
    reduced = getattr(engine.optimizer, "averaged_gradients", None)
    if reduced is not None:
        return nbytes(t for grads in reduced.values() for t in grads)
    return nbytes(p.grad for p in engine.base_model.parameters())


def real_states(engine, grads: int) -> dict[str, int]:
    optimizer = engine.optimizer
    if not hasattr(optimizer, "averaged_gradients"):  # torch AdamW on plain, DDP or FSDP2 parameters
        return {"parameters": nbytes(engine.base_model.parameters()), "gradients": grads,
                "optimizer states + master weights": nbytes(adam_states(optimizer))}
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3: each parameter's partition
        weights = nbytes(p.ds_tensor for p in engine.base_model.parameters())
        master = optimizer.fp32_partitioned_groups_flat
    else:  # ZeRO-1/2: the whole flat weights, this rank's master partition
        weights, master = nbytes(optimizer.bit16_groups_flat), optimizer.single_partition_of_fp32_groups
    return {"parameters": weights, "gradients": grads,
            "optimizer states + master weights": nbytes(master) + nbytes(adam_states(optimizer.optimizer))}


if __name__ == "__main__":
    dist, out = None, Path(sys.argv[1])
    for spec in sys.argv[2:]:
        engine_name, _, precision = spec.partition(":")
        stage = engine_name.removeprefix("zero") if engine_name.startswith("zero") else "1"
        engine_name = "deepspeed" if engine_name.startswith("zero") else engine_name
        cfg = load_config("llama_tiny", {**SHAPE, "parallel.engine": engine_name, "parallel.zero_stage": stage,
                                         "train.precision": precision or "fp32", "train.global_batch": "3",
                                         "logging.run_dir": str(out / spec.replace(":", "_"))})
        dist = dist or init_distributed(engine_name, "cpu")
        engine = build_engine(cfg, ModelRecipe(lambda: LlamaLax(cfg.model, init_seed=None),
                                               lambda model: init_weights(model, 0)), dist, token_nll)
        tokens = torch.randint(0, 131, (1, 17), generator=torch.Generator().manual_seed(dist.rank))
        engine.forward_backward(tokens[:, :-1], tokens[:, 1:], 1.0, True)
        grads = grad_bytes(engine)
        engine.step(1e-3)
        model, _ = plan.model_of(cfg)
        row = {"spec": spec, "rank": dist.rank, "real": real_states(engine, grads),
               "plan": plan.model_states(cfg, model, dist.world_size, dist.rank)}
        with open(out / f"rank{dist.rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        barrier()
    shutdown()
    end_process(0)
