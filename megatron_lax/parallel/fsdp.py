"""PyTorch FSDP2: `fully_shard` on every transformer block and on the root; sharded checkpoints
through torch.distributed.checkpoint (DCP)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ..training.optim import build_optimizer
from .engine import Engine

DCP_DIR = "dcp"


def shard_model(model: torch.nn.Module, world_size: int, device: torch.device, precision: str) -> None:
    """Shards in place. With bf16-mixed, parameters are gathered in bf16 and gradients reduced in fp32
    (the sharded fp32 parameters are the master weights)."""
    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16-mixed" else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


class FSDPEngine(Engine):
    uses_autocast = False  # the MixedPrecisionPolicy casts

    def __init__(self, cfg, dist_info, precision, loss, model, initialize=None):
        """A meta model (with `initialize`) is sharded first and then allocated shard by shard."""
        from . import materialize
        super().__init__(cfg, dist_info, precision, loss)
        if initialize is None:
            model.to(dist_info.device)
        if precision == "bf16-pure":
            model.to(torch.bfloat16)
        shard_model(model, dist_info.world_size, dist_info.device, precision)
        materialize(model, initialize, dist_info.device)
        self.model = self.base_model = model
        self.optimizer = build_optimizer(model, cfg.optim)

    def forward_backward(self, inputs, targets, loss_weight, sync):
        self.model.set_requires_gradient_sync(sync)  # reduce-scatter only on the last micro-batch
        nll, count = self.loss(self.model(inputs), targets)
        # FSDP averages gradients over ranks; scaling by the world size turns that into a sum.
        (nll * (loss_weight * self.dist.world_size)).backward()
        return nll.detach(), count

    def step(self, lr):
        self.set_lr(lr)
        return self.clipped_step(self.model.parameters())

    def state_options(self) -> StateDictOptions:
        return StateDictOptions(ignore_frozen_params=self.trainable_only, strict=not self.trainable_only)

    def save(self, directory):
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self.state_options())
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory / DCP_DIR))
        return [p.name for p in (directory / DCP_DIR).iterdir()]

    def load(self, directory):
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self.state_options())
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(directory / DCP_DIR))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self.state_options())


def consolidate(directory) -> dict:
    """The full model state dict of an FSDP checkpoint, read on one process without a process group
    (the optimizer state in the same files is not read)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(Path(directory) / DCP_DIR)),
                     planner=_EmptyStateDictLoadPlanner(keys={"model"}), no_dist=True)
    return state["model"]
