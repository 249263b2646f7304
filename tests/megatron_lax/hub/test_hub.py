"""Transformers exports (megatron_lax/hub.py): every LLaMA variant loads with AutoModelForCausalLM, in a
process that cannot import megatron_lax, and computes our logits and greedy text."""
from __future__ import annotations

import json
import math
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

transformers = pytest.importorskip("transformers")

from megatron_lax import hub  # noqa: E402
from megatron_lax.config import Config, LoraConfig, ModelConfig  # noqa: E402
from megatron_lax.generate import decode_batch  # noqa: E402
from megatron_lax.models import count_parameters  # noqa: E402
from megatron_lax.models.llama import LlamaLax  # noqa: E402
from megatron_lax.models.lora import apply_lora  # noqa: E402

TOKENIZER = REPO / "tokenizer" / "sample"
SHAPE = dict(dim=64, n_layers=3, n_heads=4, ffn_dim=128, vocab_size=8192, rank=16)
VARIANTS = {  # name: (model fields, LoRA config or None)
    "svd_identity": (dict(method="svd", lax_gate="identity"), None),
    "svd_linear_projection": (dict(method="svd", lax_gate="linear", lax_latent="projection"), None),
    "svd_dense_partial_gqa": (dict(method="svd", lax_gate="dense", lax_modules=["q", "v", "down"], n_kv_heads=2,
                                   attn_rank=8), None),
    "cola_none_only_latent_act": (dict(method="cola", only_latent_act=True), None),
    "cola_dense_small": (dict(method="cola", lax_gate="dense", lax_gate_init="small", lax_norm=False), None),
    "cola_tensor_projection": (dict(method="cola", lax_gate="tensor", lax_latent="projection", mlp_out_rank=12), None),
    "lax_lora_tensor": (dict(method="dense"), LoraConfig(rank=4, alpha=8.0, lax_gate="tensor",
                                                         targets=["q", "v", "up", "down"])),
}


def built(name: str) -> tuple[torch.nn.Module, Config, bool]:
    """A tiny model of the variant, every weight moved off its initial value (gates and LayerNorms
    included, so that each computes something)."""
    fields, lora = VARIANTS[name]
    cfg = Config()
    cfg.model = ModelConfig(**{**SHAPE, **fields})
    cfg.data.tokenizer = str(TOKENIZER)
    cfg.logging.run_dir = name
    model = LlamaLax(cfg.model, init_seed=0)
    if lora is not None:
        cfg.lora = lora
        apply_lora(model, lora)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval(), cfg, lora is not None


def exported(tmp_path: Path, name: str):
    model, cfg, lora = built(name)
    out = tmp_path / f"export_{name}"  # distinct names: transformers caches remote code by folder name
    out.mkdir()
    hub.write_transformers(model, cfg, {"step": 7, "tokens": 7168, "best_val_loss": 5.0}, out, lora=lora,
                           max_shard_size="400KB")
    return model, cfg, out


def relative_error(theirs: torch.Tensor, ours: torch.Tensor) -> float:
    return float((theirs.float() - ours.float()).abs().max() / ours.float().abs().max())


PROMPTS = [[288, 591, 4244, 1397, 282], [917, 275, 6157]]


def our_greedy(model, eos_id: int, new: int = 12) -> list[list[int]]:
    return decode_batch(model, PROMPTS, new, eos_id)


def their_greedy(theirs, eos_id: int, pad_id: int, new: int = 12) -> list[list[int]]:
    """Left-padded batch through transformers' generate (its KV cache), cut at EOS as ours is."""
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    out = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)[:, width:]
    rows = []
    for row in out.tolist():
        rows.append(row[:row.index(eos_id)] if eos_id in row else row)
    return rows


@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_computes_our_logits_and_greedy_text(tmp_path, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ours, cfg, out = exported(tmp_path, name)
    theirs = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(theirs).__module__.startswith("transformers_modules")  # the written file, not the package
    tokens = torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(theirs(tokens).logits, ours(tokens)) <= 1e-5
    assert theirs.num_parameters() == (count_parameters(cfg.model) if not VARIANTS[name][1] else
                                       sum(p.numel() for p in ours.parameters()))
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert their_greedy(theirs, tok.eos_token_id, tok.pad_token_id) == our_greedy(ours, tok.eos_token_id)


def test_export_folder_holds_what_the_hub_expects(tmp_path):
    from huggingface_hub import ModelCard
    from transformers import AutoTokenizer

    from megatron_lax.data.tokenizer import load_tokenizer
    _, _, out = exported(tmp_path, "cola_dense_small")
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_megatron_lax.MegatronLaxForCausalLM"
    assert (config["lowrank_format"], config["lax_gate"], config["lax_gate_init"]) == ("cola", "dense", "small")
    index = json.loads((out / "model.safetensors.index.json").read_text())  # over 400KB: sharded
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 1
    text = "The city council met  on Tuesday, in Zürich."
    assert AutoTokenizer.from_pretrained(out, trust_remote_code=True)(text, add_special_tokens=False)["input_ids"] == \
        load_tokenizer(str(TOKENIZER)).encode(text)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and "lax" in card.data.tags
    assert card.data.eval_results[0].metric_value == pytest.approx(148.4132, rel=1e-4)  # exp(5.0)
    assert "7,168 tokens seen" in card.text


def test_modeling_file_is_the_package_code():
    """The written file carries the package's own layers (their source, as it is there) and needs no
    megatron_lax import."""
    import ast
    import inspect

    from megatron_lax.method import lowrank
    from megatron_lax.method.svd import SVD
    source = hub.modeling_source("svd")
    assert inspect.getsource(lowrank.LowRankLinear) in source and inspect.getsource(lowrank.TensorGate) in source
    imported = {alias.name if isinstance(node, ast.Import) else node.module
                for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    assert {name.split(".")[0] for name in imported} == {"__future__", "dataclasses", "math", "typing", "torch",
                                                         "transformers"}
    assert "FORMATS = {'svd': SVD()}" in source and inspect.getsource(SVD.build) in source
    assert "def saved_bytes" not in source and "def count" not in inspect.getsource(SVD).split("def build")[0]


def global_names_read(source: str) -> set[str]:
    """The global names that the code of `source` reads (in any function or class), by the compiler's
    own scopes."""
    import symtable

    def walk(table):
        yield table
        for child in table.get_children():
            yield from walk(child)
    return {s.get_name() for t in walk(symtable.symtable(source, "modeling", "exec")) for s in t.get_symbols()
            if s.is_referenced() and (t.get_type() == "module" or s.is_global())}


def module_level_names(source: str) -> set[str]:
    import symtable
    return {s.get_name() for s in symtable.symtable(source, "modeling", "exec").get_symbols()
            if s.is_assigned() or s.is_imported()}


@pytest.mark.parametrize("template", ["llama", "vit"])
def test_modeling_file_defines_every_name_it_reads(template):
    """Each format's modeling file holds every name its code reads: the export copies only the format
    methods the model calls (training-side ones, such as the memory plan's saved_bytes, would call helpers
    the file does not hold), and every format method that the kept ones call on `self`."""
    import ast
    import builtins

    from megatron_lax.method.formats import FORMATS
    for method in FORMATS:
        source = hub.modeling_source(method, getattr(hub, f"{template}_hf"))
        missing = global_names_read(source) - module_level_names(source) - set(dir(builtins))
        assert not missing, f"{template} {method}: {sorted(missing)}"
        namespace: dict = {}
        exec(compile(source, "modeling", "exec"), namespace)
        kept = namespace["FORMATS"][method]
        read = {node.attr for cls in type(kept).__mro__ if cls.__name__ in namespace
                for node in ast.walk(next(n for n in ast.parse(source).body if getattr(n, "name", "") == cls.__name__))
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"}
        assert {name for name in read if not hasattr(kept, name)} == set(), f"{template} {method}"


@pytest.mark.parametrize("fields", [dict(method="svd", rank=16), dict(method="cola", rank=16, attn_rank=8, mlp_rank=12,
                                                                        mlp_out_rank=4, lax_gate="dense",
                                                                        lax_modules=["k", "down"])])
def test_exported_config_ranks_and_crossings_are_ours(fields):
    cfg = Config()
    cfg.model = ModelConfig(**{**SHAPE, **fields})
    config = hub.hf_config(cfg)
    for projection in ("q", "k", "v", "o", "gate", "up", "down"):
        assert config.rank_of(projection) == cfg.model.rank_of(projection)
        assert [config.crosses(projection, i) for i in range(3)] == [cfg.model.crosses(projection, i) for i in range(3)]


CHILD = r"""
import importlib.util, json, sys, torch
assert importlib.util.find_spec("megatron_lax") is None, "megatron_lax is importable"
from transformers import AutoModelForCausalLM, AutoTokenizer
tokens = torch.load(sys.argv[1])
report = {}
for folder in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        logits = model(tokens).logits
        out = model.generate(input_ids=tokens[:1, :5], max_new_tokens=8, do_sample=False)[0, 5:].tolist()
        model.save_pretrained(folder + "_again")
        again = AutoModelForCausalLM.from_pretrained(folder + "_again", trust_remote_code=True).eval()
        bf16 = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, torch_dtype=torch.bfloat16)
        auto = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, torch_dtype="auto")
        report[folder] = {"greedy": out, "again_equal": bool(torch.equal(again(tokens).logits, logits)),
                          "bf16": str(bf16(tokens).logits.dtype), "auto": str(auto.dtype),
                          "eos": tok.eos_token_id, "encoded": tok("the city council", add_special_tokens=False)["input_ids"]}
    torch.save(logits, folder + ".logits.pt")
print(json.dumps(report))
"""


def test_export_loads_where_megatron_lax_is_not_installed(tmp_path):
    """One process, its path without the editable megatron_lax, loads several variants; their logits
    and greedy tokens are ours, a save_pretrained copy reloads, bf16 and torch_dtype="auto" load."""
    from megatron_lax.data.tokenizer import load_tokenizer
    names = ["svd_identity", "cola_dense_small", "lax_lora_tensor"]
    models = {name: exported(tmp_path, name) for name in names}
    tokens = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(2))
    torch.save(tokens, tmp_path / "tokens.pt")
    (tmp_path / "child.py").write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(site.getsitepackages()), "OMP_NUM_THREADS": "1"}
    no_project = subprocess.run([sys.executable, "-S", "-c", "import megatron_lax"], cwd=tmp_path, env=env,
                                capture_output=True, text=True)
    assert no_project.returncode != 0 and "No module named 'megatron_lax'" in no_project.stderr
    folders = [str(models[name][2]) for name in names]
    done = subprocess.run([sys.executable, "-S", "child.py", "tokens.pt", *folders], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])
    for name, folder in zip(names, folders):
        ours = models[name][0]
        with torch.no_grad():
            assert relative_error(torch.load(folder + ".logits.pt"), ours(tokens)) <= 1e-5
        theirs = report[folder]
        greedy = decode_batch(ours, [tokens[0, :5].tolist()], 8, theirs["eos"])[0]
        assert theirs["greedy"][:len(greedy)] == greedy
        assert theirs["again_equal"] and theirs["bf16"] == "torch.bfloat16" and theirs["auto"] == "torch.float32"
        assert theirs["encoded"] == load_tokenizer(str(TOKENIZER)).encode("the city council")


TASKS = Path(__file__).parents[1] / "lm_eval_tasks"


@torch.no_grad()
def our_loglikelihood(model, tokenizer, context: str, continuation: str, prefix_id: int) -> float:
    """The summed log-probability of `continuation` after `context`, split into tokens as lm-eval
    splits them (the continuation's tokens are those the whole string has beyond the context's)."""
    whole, head = tokenizer.encode(context + continuation), tokenizer.encode(context)
    ids = [prefix_id] + whole if not head else whole
    start = len(head) if head else 1
    logprobs = torch.log_softmax(model(torch.tensor([ids])).float()[0], dim=-1)
    return float(sum(logprobs[i - 1, ids[i]] for i in range(start, len(ids))))


def test_lm_eval_scores_an_export_as_we_do(tmp_path, monkeypatch):
    """lm-evaluation-harness (its hf model, trust_remote_code) on an exported CoLA + LaX model: each
    multiple-choice log-likelihood is ours for the same strings, and its rolling word perplexity is
    the one our evaluation's per-sequence NLL gives the same text."""
    lm_eval = pytest.importorskip("lm_eval")
    import re

    from lm_eval.tasks import TaskManager

    from megatron_lax.tasks.language_modeling import sequence_nll
    from megatron_lax.data.tokenizer import load_tokenizer
    ours, _, out = exported(tmp_path, "cola_dense_small")
    monkeypatch.chdir(REPO)  # the tasks' data_files are relative to the repository root
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={out},trust_remote_code=True,dtype=float32", device="cpu", batch_size=2,
        tasks=["megatron_lax_tiny_choice", "megatron_lax_tiny_perplexity"], log_samples=True,
        task_manager=TaskManager(include_path=str(TASKS)))
    tokenizer = load_tokenizer(str(TOKENIZER))
    choices = results["samples"]["megatron_lax_tiny_choice"]
    assert len(choices) == 4
    for sample in choices:
        for (context, continuation), response in zip(sample["arguments"], sample["resps"]):
            theirs = response[0][0]
            assert theirs == pytest.approx(our_loglikelihood(ours, tokenizer, context, continuation,
                                                             tokenizer.bos_id), rel=1e-4, abs=1e-4)
    docs = [json.loads(line)["text"] for line in (TASKS / "tiny_perplexity.jsonl").read_text().splitlines()]
    rows = [torch.tensor([[tokenizer.bos_id] + tokenizer.encode(text)]) for text in docs]
    nll = sequence_nll(ours, [(row[:, :-1], row[:, 1:]) for row in rows], torch.device("cpu"))
    words = sum(len(re.split(r"\s+", text)) for text in docs)
    expected = math.exp(float(nll[:, 0].sum()) / words)
    measured = results["results"]["megatron_lax_tiny_perplexity"]["word_perplexity,none"]
    assert measured == pytest.approx(expected, rel=1e-4)


def test_export_follows_transformers_conventions(tmp_path):
    """device_map="auto" loads it, labels give our loss, gradient checkpointing gives the same
    gradients (the latents crossing blocks included), PEFT wraps its linear factors, Trainer steps."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from megatron_lax.models.llama import token_nll
    ours, _, out = exported(tmp_path, "svd_linear_projection")
    tokens = torch.randint(0, 8192, (2, 12), generator=torch.Generator().manual_seed(3))
    mapped = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, device_map="auto")
    with torch.no_grad():
        assert relative_error(mapped(tokens).logits, ours(tokens)) <= 1e-5
        nll, n = token_nll(ours(tokens)[:, :-1], tokens[:, 1:])
        assert float(mapped(tokens, labels=tokens).loss) == pytest.approx(float(nll / n), rel=1e-5)

    def gradients(checkpointing: bool) -> dict:
        model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(tokens, labels=tokens).loss.backward()
        return {k: p.grad for k, p in model.named_parameters()}
    plain, checkpointed = gradients(False), gradients(True)
    assert plain["model.layers.0.attn.q.A.weight"].abs().sum() > 0
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6)

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["A", "B"]))
    assert 0 < sum(p.numel() for p in wrapped.parameters() if p.requires_grad) < model.num_parameters() / 10
    data = [{"input_ids": row, "labels": row} for row in tokens]
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=1, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, save_strategy="no")
    assert Trainer(model=wrapped, args=args, train_dataset=data).train().training_loss > 0


@pytest.mark.parametrize("fields", [dict(method="tt", rank=8, lax_gate="tensor", lax_intra_modules=["fc1", "q"],
                                         tt_attn_dims=[8, 12, 12, 8], tt_fc1_dims=[8, 12, 16, 12],
                                         tt_fc2_dims=[16, 12, 8, 12]),
                                    dict(method="cola", rank=8, lax_gate="linear", lax_latent="projection")])
def test_vit_export_computes_our_logits(tmp_path, fields):
    """A tensor-train ViT with intra-layer LaX (and a CoLA one) as AutoModelForImageClassification."""
    from transformers import AutoModelForImageClassification

    from megatron_lax.models.vit import ViTLax
    cfg = Config()
    cfg.model = ModelConfig(arch="vit", dim=96, n_layers=2, n_heads=3, ffn_dim=192, image_size=28, patch_size=7,
                            in_channels=1, num_classes=10, **fields)
    ours = ViTLax(cfg.model, init_seed=0).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    out = tmp_path / f"vit_{fields['method']}"
    out.mkdir()
    hub.write_vit_transformers(ours, cfg, {"step": 1}, out)
    theirs = AutoModelForImageClassification.from_pretrained(out, trust_remote_code=True).eval()
    pixels = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(theirs(pixel_values=pixels).logits, ours(pixels)) <= 1e-5
    assert theirs.num_parameters() == count_parameters(cfg.model)
