"""Building the model for an engine: a 1B model under FSDP2 is never whole on one rank, and the whole
model traces into one graph (no graph breaks), so train.compile compiles what it claims to."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, free_port, run_command


def test_fsdp_builds_llama_1b_without_materialising_it():
    """llama_1b CoLA + LaX (609M parameters, 2.4 GB in fp32) from a ModelRecipe on 2 CPU ranks: each
    rank holds half the parameters, and its peak RSS grows by its shard plus the largest single
    parameter being initialised (about 0.7 of the unsharded size), never by the whole model."""
    script = Path(__file__).with_name("build_rss.py")
    result = run_command([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(free_port()), str(script)], timeout=600)
    ranks = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(ranks) == 2
    total = ranks[0]["unsharded_bytes"] // 4
    assert sum(r["local_params"] for r in ranks) == total
    for r in ranks:
        assert abs(r["local_params"] - total / 2) < 0.01 * total
        assert r["growth"] < 0.85 * r["unsharded_bytes"], r


@pytest.mark.parametrize("method,gate", [("dense", "none"), ("svd", "identity"), ("cola", "dense")])
def test_whole_model_traces_into_one_graph(method, gate):
    """fullgraph=True makes any graph break an error; aot_eager also traces the backward."""
    from megatron_lax.config import load_config
    from megatron_lax.models.llama import LlamaLax, token_nll

    cfg = load_config("llama_tiny", {**TINY, "model.method": method, "model.lax_gate": gate, "model.vocab_size": "128"})
    inputs, targets = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0)).split(1)
    eager, traced = LlamaLax(cfg.model), LlamaLax(cfg.model)
    compiled = torch.compile(traced, fullgraph=True, backend="aot_eager")
    for model in (eager, compiled):
        token_nll(model(inputs), targets)[0].backward()
    torch.testing.assert_close(compiled(inputs), eager(inputs))
    for a, b in zip(traced.parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6 * float(b.grad.abs().max()))


def test_compiled_blocks_use_sdpa_where_flash_attn_would_break_the_graph(monkeypatch):
    """flash-attn before 2.6 is not a custom op: under fullgraph compile it is not called (SDPA is)."""
    from megatron_lax.models import llama

    class CudaLike:
        is_cuda, dtype = True, torch.bfloat16

    monkeypatch.setattr(llama, "flash_attn_func", lambda *a, **k: None)
    for compiles, compiling, expected in ((True, True, True), (False, True, False), (False, False, True)):
        monkeypatch.setattr(llama, "FLASH_ATTN_COMPILES", compiles)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        assert llama.flash_attn_usable(CudaLike(), requested=True) is expected
    assert llama.flash_attn_usable(CudaLike(), requested=False) is False
