"""Converting a DeepSpeed checkpoint for another number of ranks: rank 0 converts while the others
wait as long as it takes, not the process group's timeout (NCCL's 10 minutes; here 2 s)."""
from __future__ import annotations

import sys

from conftest import free_port, run_command

SLOW_CONVERSION_ON_TWO_RANKS = """
import os, sys, time
from datetime import timedelta
from pathlib import Path
import torch
import torch.distributed as dist
dist.init_process_group("gloo", timeout=timedelta(seconds=2))
import deepspeed.checkpoint.ds_to_universal as ds_to_universal
def slow_conversion(args):
    time.sleep(5)  # longer than the process group's timeout
    Path(args.output_folder).mkdir()
ds_to_universal.main = slow_conversion
from megatron_lax.parallel.deepspeed_engine import UNIVERSAL, universal_checkpoint
from megatron_lax.parallel.distributed import DistInfo
directory = Path(sys.argv[1])
tag = universal_checkpoint(directory, DistInfo(dist.get_rank(), 2, dist.get_rank(), torch.device("cpu")))
assert tag == UNIVERSAL and (directory / UNIVERSAL).is_dir()
dist.barrier()
print("converted on rank", dist.get_rank())
dist.destroy_process_group()
"""


def test_other_ranks_wait_for_a_conversion_longer_than_the_process_group_timeout(tmp_path):
    script = tmp_path / "convert.py"
    script.write_text(SLOW_CONVERSION_ON_TWO_RANKS)
    (tmp_path / "checkpoint" / "deepspeed").mkdir(parents=True)
    result = run_command([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(free_port()), str(script), str(tmp_path / "checkpoint")],
                         timeout=120)
    assert result.stdout.count("converted on rank") == 2
