"""Several training runs in one process group, so that a test pays for one torchrun (and one
DeepSpeed start) per engine:  torchrun ... train_runs.py RUNS.json

RUNS.json is a list of {"overrides": {"section.key": value, ...}, "nan_steps": [step, ...]}; every
run starts from the llama_tiny preset, and nan_steps poisons the gradients of those steps."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from megatron_lax import faults  # noqa: E402
from megatron_lax.config import load_config  # noqa: E402
from megatron_lax.parallel.distributed import shutdown  # noqa: E402
from megatron_lax.train import Trainer  # noqa: E402


def run_all(runs: list[dict]) -> None:
    for run in runs:
        faults.NAN_STEPS.clear()
        faults.NAN_STEPS.update(run.get("nan_steps", []))
        Trainer(load_config("llama_tiny", {k: str(v) for k, v in run["overrides"].items()})).fit()
    faults.NAN_STEPS.clear()


if __name__ == "__main__":
    try:
        run_all(json.loads(Path(sys.argv[1]).read_text()))
    finally:
        shutdown()
