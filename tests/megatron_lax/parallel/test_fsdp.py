"""FSDP2 on one CPU rank (gloo): bf16-mixed keeps the rotary tables fp32 inside the blocks, and the
initial values are assigned on torch versions whose distribute_tensor has no src_data_rank (2.6)."""
from __future__ import annotations

import json
import sys

from conftest import free_port, run_command

ONE_RANK_FSDP = """
import inspect, json, os, sys
import torch
import torch.distributed as dist
import torch.distributed.tensor as dtensor
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo")
original = dtensor.distribute_tensor
if sys.argv[2] == "torch2.6":  # distribute_tensor as torch 2.6 has it: no src_data_rank
    def distribute_tensor(tensor, device_mesh=None, placements=None):
        return original(tensor, device_mesh, placements)
    dtensor.distribute_tensor = distribute_tensor
from megatron_lax.config import load_config
from megatron_lax.method.init import init_weights
from megatron_lax.models.llama import LlamaLax
from megatron_lax.parallel.fsdp import shard_model
cfg = load_config("llama_tiny", {"model.vocab_size": "64", "model.dim": "32", "model.n_layers": "2",
                                 "model.n_heads": "2", "model.ffn_dim": "64", "model.method": "cola",
                                 "model.lax_gate": "identity", "model.rank": "8"}).model
with torch.device("meta"):
    model = LlamaLax(cfg, init_seed=None)
shard_model(model, 1, torch.device("cpu"), "bf16-mixed")
model.to_empty(device="cpu")
init_weights(model, 0)
reference = LlamaLax(cfg, init_seed=0)
same = all(torch.equal(p.full_tensor(), reference.state_dict()[name]) for name, p in model.named_parameters())
seen = []
model.layers[1].register_forward_pre_hook(lambda module, args: seen.append([str(a.dtype) for a in args[:3]]))
model(torch.randint(0, 64, (2, 8)))
print(json.dumps({"same_values": same, "block_inputs": seen[0]}))
dist.destroy_process_group()
"""


def test_bf16_mixed_blocks_keep_fp32_rotary_tables_and_values_are_assigned_as_on_torch_2_6():
    out = run_command([sys.executable, "-c", ONE_RANK_FSDP, str(free_port()), "torch2.6"]).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {"same_values": True, "block_inputs": ["torch.bfloat16", "torch.float32", "torch.float32"]}
