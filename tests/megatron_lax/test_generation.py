"""Incremental decoding: the KV cache, left padding and beam search compute what a full recompute
does; grouped-query attention computes what Hugging Face's LLaMA does."""
from __future__ import annotations

import pytest
import torch

from megatron_lax.config import LoraConfig, ModelConfig
from megatron_lax.generate import decode_batch
from megatron_lax.models.lora import apply_lora
from megatron_lax.models.llama import LlamaLax

PROMPTS = [[5, 9, 2, 7, 3, 8, 4], [11, 3], [6, 6, 20, 31, 2], [40]]


def tiny(n_kv_heads=0, **extra) -> LlamaLax:
    cfg = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=n_kv_heads, ffn_dim=48, vocab_size=64,
                      method="dense", **extra)
    model = LlamaLax(cfg, init_seed=0)
    with torch.no_grad():  # larger weights: peaked, varied predictions (and EOS now and then)
        for p in model.parameters():
            p.mul_(8.0 if p.dim() == 2 else 1.0)
    global EOS
    EOS = decode_batch(model.eval(), PROMPTS, 3, eos_id=-1)[0][2]  # a token greedy decoding emits: some outputs end early
    return model


@torch.no_grad()
def greedy_recompute(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The reference: every step runs the whole sequence, no cache, no padding."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        token = int(model(torch.tensor([ids]))[0, -1].argmax())
        if token == EOS:
            break
        ids.append(token)
    return ids[len(prompt):]


@torch.no_grad()
def beam_recompute(model, prompt: list[int], max_new_tokens: int, k: int) -> list[int]:
    """The same rule, one hypothesis at a time, recomputing every sequence in full: keep the k best
    live beams of the 2k best extensions, finished hypotheses scored log p / length."""
    def logprobs(ids):
        return torch.log_softmax(model(torch.tensor([ids]))[0, -1].double(), -1)
    live, finished = [((), 0.0)], []
    for step in range(max_new_tokens):
        candidates = []
        for tokens, score in live:
            lp = logprobs(prompt + list(tokens))
            top = lp.topk(2 * k)
            candidates += [(tokens, t, score + float(s)) for s, t in zip(top.values, top.indices.tolist())]
        candidates.sort(key=lambda c: -c[2])
        candidates = candidates[:2 * k]
        live = []
        for tokens, t, score in candidates:
            if t == EOS:
                finished.append((score / (len(tokens) + 1), tokens))
            elif len(live) < k:
                live.append((tokens + (t,), score))
        finished = sorted(finished, key=lambda h: -h[0])[:k]
        if len(finished) == k and finished[-1][0] >= live[0][1] / (step + 1):
            break
    else:
        finished += [(score / max_new_tokens, tokens) for tokens, score in live]
    return list(max(finished, key=lambda h: h[0])[1])


@pytest.mark.parametrize("n_kv_heads", [0, 2, 1])
def test_kv_cache_greedy_equals_full_recompute_token_for_token(n_kv_heads):
    model = tiny(n_kv_heads)
    batched = decode_batch(model, PROMPTS, 12, EOS)
    assert batched == [greedy_recompute(model, p, 12) for p in PROMPTS]
    assert len({len(out) for out in batched}) > 1  # some stop at EOS before others


def test_left_padding_does_not_change_a_prompt_s_logits():
    model = tiny(2)
    from megatron_lax.generate import _start
    logits, _, _ = _start(model, PROMPTS, 1, 4)
    for row, p in enumerate(PROMPTS):
        torch.testing.assert_close(logits[row], model(torch.tensor([p]))[0, -1], rtol=1e-5, atol=1e-5)


def test_lax_lora_decodes_the_same_with_and_without_the_cache():
    model = apply_lora(tiny(), LoraConfig(rank=4, alpha=8, lax_gate="linear"), seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapter.B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    assert decode_batch(model, PROMPTS, 10, EOS) == [greedy_recompute(model, p, 10) for p in PROMPTS]


@pytest.mark.parametrize("k", [2, 4])
def test_beam_search_matches_a_recomputing_reference(k):
    model = tiny(2)
    beams = decode_batch(model, PROMPTS, 6, EOS, num_beams=k)
    assert beams == [beam_recompute(model, p, 6, k) for p in PROMPTS]
    assert beams != decode_batch(model, PROMPTS, 6, EOS)  # beam search finds other answers than greedy here


def test_beam_search_scores_at_least_greedy():
    model = tiny()
    def score(prompt, out):
        ids, total = list(prompt), 0.0
        for t in out + [EOS]:
            total += float(torch.log_softmax(model(torch.tensor([ids]))[0, -1].double(), -1)[t])
            ids.append(t)
        return total / (len(out) + 1)
    greedy, beams = decode_batch(model, PROMPTS, 8, EOS), decode_batch(model, PROMPTS, 8, EOS, num_beams=4)
    finished = [len(g) < 8 for g in greedy]
    for p, g, b, f in zip(PROMPTS, greedy, beams, finished):
        if f and len(b) < 8:
            assert score(p, b) >= score(p, g) - 1e-9


def test_grouped_query_attention_equals_hugging_face_llama():
    transformers = pytest.importorskip("transformers")
    from megatron_lax.export import hf_config, hf_state_dict
    ours = tiny(2)
    cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config(ours.cfg).items()
                                      if k not in ("architectures", "model_type", "torch_dtype")})
    assert cfg.num_key_value_heads == 2 < cfg.num_attention_heads == 4
    theirs = transformers.LlamaForCausalLM(cfg).eval()
    theirs.load_state_dict(hf_state_dict(ours), strict=False)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)


def test_parameter_count_and_flops_know_grouped_query_attention():
    from megatron_lax.models.llama import count_parameters
    model = tiny(1)
    assert count_parameters(model.cfg) == sum(p.numel() for p in model.parameters())
    assert model.layers[0].attn.k.weight.shape == (8, 32)
