"""Initialisation rules read the shapes a parameter has in the model, not the storage a sharding
engine leaves it: under DeepSpeed's zero.Init every parameter is an empty partition."""
from __future__ import annotations

import json
import sys

from conftest import free_port, run_command

RULES_UNDER_ZERO_INIT = """
import json, os, sys
import torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo")
import deepspeed
from megatron_lax.method.lowrank import TensorGate
from megatron_lax.method.tensor_train import TTLinear

def build():
    return TensorGate(24, init="kaiming"), TTLinear([4, 6], [8, 3], 6, None, "tensor", gate_init="kaiming")

def rules(modules):
    return {f"{i}.{k}": v for i, m in enumerate(modules) for k, v in m.init_rules("", "kaiming", 0.02).items()}

plain = build()
with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}):
    partitioned = build()
assert tuple(partitioned[0].core0.shape) == (0,), "zero.Init did not partition"
print(json.dumps([rules(plain), rules(partitioned)]))
dist.destroy_process_group()
"""


def test_kaiming_rules_of_tensor_gates_and_tt_cores_are_the_same_under_zero3():
    out = run_command([sys.executable, "-c", RULES_UNDER_ZERO_INIT, str(free_port())]).stdout
    plain, partitioned = json.loads(out.strip().splitlines()[-1])
    assert partitioned == plain
