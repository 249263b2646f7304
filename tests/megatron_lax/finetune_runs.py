"""Several fine-tuning runs in one process group (one torchrun for all engines):

    torchrun ... finetune_runs.py RUNS.json        RUNS.json: a list of {"section.key": value} overrides"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_lax.config import load_config  # noqa: E402
from megatron_lax.parallel.distributed import barrier, end_process, shutdown  # noqa: E402
from megatron_lax.train import make_trainer  # noqa: E402

if __name__ == "__main__":
    try:
        for overrides in json.loads(Path(sys.argv[1]).read_text()):
            make_trainer(load_config(None, overrides), "instruction_tuning").fit()
        barrier()  # no rank tears the group down while another still uses it
    finally:
        shutdown()
    end_process(0)
