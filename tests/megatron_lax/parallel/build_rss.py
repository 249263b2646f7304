"""Builds the llama_1b CoLA + LaX model under FSDP2 from a ModelRecipe and prints, as one JSON line per
rank, the growth of the process's peak RSS and the unsharded fp32 size:  torchrun ... build_rss.py"""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from megatron_lax.config import load_config  # noqa: E402
from megatron_lax.models.llama import LlamaLax, count_parameters, token_nll  # noqa: E402
from megatron_lax.method.init import init_weights  # noqa: E402
from megatron_lax.parallel import ModelRecipe, build_engine  # noqa: E402
from megatron_lax.parallel.distributed import barrier, end_process, init_distributed, shutdown  # noqa: E402


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


if __name__ == "__main__":
    cfg = load_config("llama_1b", {"model.method": "cola", "model.lax_gate": "identity", "model.vocab_size": "32000",
                                   "parallel.engine": "fsdp", "train.precision": "fp32", "train.device": "cpu",
                                   "train.micro_batch": "1", "train.global_batch": "2"})
    dist = init_distributed("fsdp", "cpu")
    before = peak_rss_bytes()
    engine = build_engine(cfg, ModelRecipe(lambda: LlamaLax(cfg.model, init_seed=None),
                                           lambda model: init_weights(model, 0)), dist, token_nll)
    local = sum(p.to_local().numel() for p in engine.model.parameters())
    print(json.dumps({"rank": dist.rank, "growth": peak_rss_bytes() - before, "local_params": local,
                      "unsharded_bytes": 4 * count_parameters(cfg.model)}), flush=True)
    barrier()
    shutdown()
    end_process(0)
