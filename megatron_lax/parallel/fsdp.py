"""PyTorch FSDP2: `fully_shard` on every transformer block and on the root; sharded checkpoints
through torch.distributed.checkpoint (DCP)."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from . import trust
from .optim import build_optimizer
from .engine import Engine, materialize

DCP_DIR = "dcp"


# --- reading DCP checkpoints without unpickling arbitrary objects ---------------------------------------
# DCP pickles its metadata (.metadata) and torch.saves every non-tensor value (the optimizer's
# hyperparameters) with full pickling, and reads both back the same way. The reader and planners
# below read the metadata allowing only DCP's own classes, and each non-tensor value as plain data.

DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "StorageMeta", "MetadataIndex", "TensorProperties",
                                              "TensorStorageMetadata", "ChunkStorageMetadata",
                                              "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"} | {name for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
    "pathlib": {"PosixPath", "WindowsPath", "Path"},
}


class PlainDataReader(FileSystemReader):
    """Reads the metadata when it is made, outside DCP's machinery, so that a refusal is one line."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        metadata_path = Path(path) / ".metadata"
        if not metadata_path.is_file():
            raise FileNotFoundError(f"{metadata_path}: missing; not a complete DCP checkpoint")
        self.metadata = trust.restricted_load(metadata_path, DCP_METADATA_CLASSES, "DCP metadata")
        if not isinstance(self.metadata, Metadata):
            raise ValueError(f"{metadata_path}: not DCP metadata")
        root = Path(path).resolve()
        for info in (self.metadata.storage_data or {}).values():
            relative = str(getattr(info, "relative_path", ""))
            if Path(relative).is_absolute() or not (root / relative).resolve().is_relative_to(root):
                raise ValueError(f"{metadata_path}: names a storage file outside the checkpoint ({relative!r})")

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if getattr(self.metadata, "storage_meta", None) is None:
            self.metadata.storage_meta = StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


def plain_value(value: io.BytesIO, source: Path) -> io.BytesIO:
    """A non-tensor value of a DCP checkpoint, read as plain data and handed on re-serialised (so
    DCP's own full unpickling of it sees only what weights_only let through)."""
    try:
        plain = torch.load(value, weights_only=True)
    except pickle.UnpicklingError:  # never unpickled, flag or not: FSDP2 checkpoints hold plain data only
        raise trust.UntrustedFile(f"{source} holds a value that is a pickled Python object, not plain data, which can "
                                  f"run code when loaded; this code never writes one, so it is not loaded") from None
    out = io.BytesIO()
    torch.save(plain, out)
    out.seek(0)
    return out


class _PlainValues:
    source: Path

    def load_bytes(self, read_item, value):
        super().load_bytes(read_item, plain_value(value, self.source))


class PlainDataPlanner(_PlainValues, DefaultLoadPlanner):
    pass


class PlainDataModelPlanner(_PlainValues, _EmptyStateDictLoadPlanner):
    pass


def dcp_reading(directory: Path, planner_class=PlainDataPlanner, **planner_args):
    """(storage reader, planner) for the DCP checkpoint in directory/dcp."""
    planner = planner_class(**planner_args)
    planner.source = Path(directory) / DCP_DIR
    return PlainDataReader(planner.source), planner


def reading_errors_unwrapped(load) -> None:
    """Runs a DCP load; a refusal or a one-line error raised while reading (DCP wraps every failure,
    on every rank, into a CheckpointException) is raised as it was."""
    try:
        load()
    except CheckpointException as e:
        for error, _ in e.failures.values():
            if isinstance(error, ValueError):
                raise error from None
        raise


def shard_model(model: torch.nn.Module, world_size: int, device: torch.device, precision: str) -> None:
    """Shards in place. With bf16-mixed, parameters are gathered in bf16 and gradients reduced in fp32
    (the sharded fp32 parameters are the master weights). Forward inputs are not cast: the blocks'
    rotary cos/sin stay fp32, as under DDP's autocast (the activations are bf16 already)."""
    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if precision == "bf16-mixed" else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


class FSDPEngine(Engine):
    uses_autocast = False  # the MixedPrecisionPolicy casts

    def __init__(self, cfg, dist_info, precision, loss, model, initialize=None):
        """A meta model (with `initialize`) is sharded first and then allocated shard by shard."""
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
        reader, planner = dcp_reading(directory)
        reading_errors_unwrapped(lambda: dcp.load(state, storage_reader=reader, planner=planner))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self.state_options())


def consolidate(directory) -> dict:
    """The full model state dict of an FSDP checkpoint, read on one process without a process group
    (the optimizer state in the same files is not read)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    reader, planner = dcp_reading(directory, PlainDataModelPlanner, keys={"model"})
    reading_errors_unwrapped(lambda: _load_state_dict(state, storage_reader=reader, planner=planner, no_dist=True))
    return state["model"]
