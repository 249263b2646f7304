"""Fine-tuning end to end on a tiny pre-trained base: the step-0 identity, learning, exact resume,
engine parity on 2 processes (DDP, FSDP2, ZeRO-2), bases of every kind (ours, SVD merged, Hugging Face, sharded, tied),
refusals in one line, and exports (PEFT, merged, LaX-LoRA)."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, free_port, losses, run_command
from megatron_lax.parallel import trust
from megatron_lax.config import load_config
from megatron_lax.evaluate import load_model
from megatron_lax.export import export, export_finetuned
from megatron_lax.loading.finetuned import load_lax_lora
from megatron_lax.loading.huggingface import load_hf_llama
from megatron_lax.finetune import main
from megatron_lax.loading.bases import load_base
from megatron_lax.loading.finetuned import load_finetuned
from megatron_lax.models.llama import token_nll
from megatron_lax.training.trainer import Trainer
from megatron_lax.train import make_trainer

RUNS_SCRIPT = Path(__file__).parents[1] / "finetune_runs.py"
TOKENS = torch.randint(0, 8000, (2, 20), generator=torch.Generator().manual_seed(0))


def pretrained(prepared: Path, run_dir: Path, **extra) -> Path:
    values = {**TINY, "train.steps": 2, "optim.lr": 1e-2, "data.path": str(prepared), "logging.run_dir": str(run_dir),
              "logging.lax_stats_every": 0, **extra}
    make_trainer(load_config("llama_tiny", {k: str(v) for k, v in values.items()})).fit()
    return run_dir


@pytest.fixture(scope="module")
def base(prepared_sample, tmp_path_factory) -> Path:
    return pretrained(prepared_sample, tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    from data_prep.make_arithmetic import operand_pools, problems
    out, pools = tmp_path_factory.mktemp("task"), operand_pools(0)
    (out / "train.json").write_text(json.dumps(problems(88, pools["train"], "train")))
    (out / "test.json").write_text(json.dumps(problems(10, pools["test"], "test")))
    return out


def settings(base: Path, task: Path, run_dir: Path, **extra) -> dict[str, str]:
    values = {"finetune.base": base, "finetune.train_json": task / "train.json", "finetune.test_json": task / "test.json",
              "finetune.val_size": 8, "finetune.max_new_tokens": 8, "lora.rank": 4, "lora.alpha": 8,
              "train.global_batch": 8, "train.micro_batch": 4, "train.steps": 6, "optim.lr": 1e-2,
              "optim.warmup_steps": 1, "logging.run_dir": run_dir, "logging.log_every": 1, "logging.progress": "false",
              "logging.tensorboard": "false", "logging.lax_stats_every": 0,
              "finetune.train_on_inputs": "false"}  # the response only: a clear signal in a few steps
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return {k: str(v) for k, v in values.items()}


def trainer(*args, **extra) -> Trainer:
    return make_trainer(load_config(None, settings(*args, **extra)), "instruction_tuning")


@pytest.fixture(scope="module")
def lora_run(base, task, tmp_path_factory) -> Path:
    """Plain LoRA, 6 steps, checkpoints at 3 and 6."""
    run_dir = tmp_path_factory.mktemp("lora")
    trainer(base, task, run_dir, checkpoint__every=3).fit()
    return run_dir


@pytest.fixture(scope="module")
def lax_run(base, task, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("lax")
    trainer(base, task, run_dir, lora__lax_gate="linear").fit()
    return run_dir


# --- training ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("gate", ["none", "linear"])
def test_finetuning_starts_at_the_base_loss_and_lowers_it(base, task, tmp_path, gate):
    run = trainer(base, task, tmp_path, lora__lax_gate=gate, train__steps=10, optim__lr=2e-2, logging__log_every=5)
    frozen = load_base(str(base))
    with torch.no_grad():
        nll = sum(float(token_nll(frozen(x), y)[0]) for x, y in run.val_batches)
        count = sum(int((y != -100).sum()) for _, y in run.val_batches)
    before = run.validate()["val_loss"]
    assert before == pytest.approx(nll / count, rel=1e-6)  # B = 0: the adapted model is the base
    after = run.fit()["val_loss"]
    assert after < before - 0.3, (before, after)
    assert all(p.requires_grad == (".adapter." in n) for n, p in run.engine.base_model.named_parameters())
    if gate == "linear":
        betas = [float(p.detach()) for n, p in run.engine.base_model.named_parameters() if n.endswith("lax_gate.beta")]
        assert len(betas) == 5 and all(b != 1.0 for b in betas)  # one gate per adapter of block 1


def test_resume_reproduces_the_uninterrupted_run_exactly(base, task, lora_run, tmp_path):
    trainer(base, task, tmp_path, checkpoint__resume=lora_run / "checkpoints" / "step_00000003").fit()
    full, resumed = losses(lora_run), losses(tmp_path)
    assert sorted(resumed) == [4, 5, 6] and all(resumed[s] == full[s] for s in resumed)
    step3 = lora_run / "checkpoints" / "step_00000003"
    for field, value, message in [("lora.rank", 8, "lora.rank: 4 -> 8"), ("lora.alpha", 16, "lora.alpha: 8.0 -> 16.0"),
                                  ("lora.dropout", 0.1, "lora.dropout: 0.0 -> 0.1"),
                                  ("finetune.train_on_inputs", "true", "finetune.train_on_inputs: False -> True")]:
        with pytest.raises(Exception, match=message):
            trainer(base, task, tmp_path / "other", **{field.replace(".", "__"): value},
                    checkpoint__resume=step3).fit()
    other_base = tmp_path / "other_base"
    shutil.copytree(base, other_base)
    with pytest.raises(Exception, match="finetune.base: "):
        trainer(other_base, task, tmp_path / "other", checkpoint__resume=step3).fit()


def test_full_finetuning_trains_every_weight_and_keep_best_keeps_the_lowest_validation_loss(base, task, tmp_path,
                                                                                         monkeypatch):
    import math

    from megatron_lax.tasks.instruction_tuning import method_label
    from megatron_lax.loading.finetuned import selected_checkpoint
    from megatron_lax.tasks.instruction_tuning import InstructionTuning
    scripted = iter([5.0, 3.0, 4.0, 3.5, 6.0, 7.0])  # validation losses of steps 1-6: the best is step 2's
    original = InstructionTuning.evaluate

    def evaluate(self, engine, batches, seen=0):
        loss = next(scripted)
        return {**original(self, engine, batches, seen), "val_loss": loss, "val_ppl": math.exp(loss)}
    monkeypatch.setattr(InstructionTuning, "evaluate", evaluate)
    run = trainer(base, task, tmp_path, finetune__full="true", train__eval_every=1, train__steps=6)
    run.fit()
    assert all(p.requires_grad for p in run.engine.base_model.parameters())
    best = selected_checkpoint(tmp_path)
    assert best == tmp_path / "best" / "step_00000002"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir())[-1] == "step_00000006"
    model, cfg, _ = load_finetuned(best)
    assert method_label(cfg) == "full fine-tuning" and not any(".adapter." in n for n, _ in model.named_parameters())
    monkeypatch.undo()
    no_best = trainer(base, task, tmp_path / "last", finetune__keep_best="false", train__steps=2)
    no_best.fit()
    assert selected_checkpoint(tmp_path / "last") == tmp_path / "last" and not (tmp_path / "last" / "best").exists()


def test_bos_follows_the_base_s_own_convention(base, tmp_path):
    transformers = pytest.importorskip("transformers")
    from conftest import REPO
    from megatron_lax.tasks.instruction_tuning import uses_bos
    from megatron_lax.data.tokenizer import load_tokenizer
    ours = load_tokenizer(str(REPO / "tokenizer" / "sample"))
    assert ours.bos_id >= 0 and not uses_bos("auto", str(base), ours)  # our pre-training never saw BOS
    for adds, name in ((True, "llama"), (False, "no_bos")):
        directory = tmp_path / name
        transformers.LlamaTokenizer(vocab_file=str(REPO / "tokenizer" / "sample" / "tokenizer.model"),
                                    add_bos_token=adds, legacy=True).save_pretrained(directory)
        (directory / "config.json").write_text("{}")  # a Hugging Face model directory as far as base_kind sees
        assert uses_bos("auto", str(directory), load_tokenizer(str(directory))) is adds
    assert uses_bos("true", str(base), ours) and not uses_bos("false", str(tmp_path / "llama"), ours)


def test_a_lora_checkpoint_holds_the_adapters_only_and_another_base_is_refused(prepared_sample, base, task,
                                                                                 lora_run, tmp_path):
    saved = torch.load(lora_run / "checkpoints" / "step_00000006" / "model.pt", weights_only=True)
    assert saved and all(".adapter." in k for k in saved)  # no frozen weight in the checkpoint
    model, _, _ = load_finetuned(lora_run)
    assert sum(p.numel() for p in saved.values()) == 6144 < sum(p.numel() for p in model.parameters())
    moved = tmp_path / "base"
    shutil.copytree(base, moved)
    run_dir = tmp_path / "run"
    trainer(moved, task, run_dir, train__steps=2, checkpoint__every=1).fit()
    shutil.rmtree(moved)
    shutil.copytree(pretrained(prepared_sample, tmp_path / "other", **{"train.seed": 1}), moved)  # same path, other weights
    with pytest.raises(Exception, match="is not the base this run was trained on"):
        load_finetuned(run_dir)
    with pytest.raises(Exception, match="is not the base this run was trained on"):
        export_finetuned(run_dir, tmp_path / "export")
    with pytest.raises(Exception, match="finetune.base_fingerprint"):
        trainer(moved, task, tmp_path / "resumed", train__steps=2,
                checkpoint__resume=run_dir / "checkpoints" / "step_00000001").fit()


def test_under_bf16_training_the_frozen_projections_are_held_in_bf16(base, task, tmp_path):
    run = trainer(base, task, tmp_path, train__precision="bf16-mixed", train__steps=2)
    model = run.engine.base_model
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["layers.0.attn.q.base.weight"] == dtypes["lm_head.weight"] == torch.bfloat16
    assert dtypes["embed.weight"] == dtypes["norm.weight"] == dtypes["layers.0.attn_norm.weight"] == torch.float32
    assert all(dtypes[n] == torch.float32 for n in dtypes if ".adapter." in n)
    fp32 = trainer(base, task, tmp_path / "fp32", train__steps=2)
    assert fp32.cfg.finetune.base_fingerprint == run.cfg.finetune.base_fingerprint  # one base, either dtype
    assert run.fit()["val_loss"] == pytest.approx(fp32.fit()["val_loss"], rel=0.02)


ENGINES = {"ddp": {"parallel__engine": "ddp"}, "fsdp": {"parallel__engine": "fsdp"},
           "zero2": {"parallel__engine": "deepspeed", "parallel__zero_stage": 2}}


def test_ddp_fsdp2_and_zero2_on_two_processes_match_one_process(base, task, tmp_path):
    lax = {"lora__lax_gate": "linear", "train__micro_batch": 2}
    single = tmp_path / "single"
    trainer(base, task, single, **lax).fit()
    runs = [settings(base, task, tmp_path / name, **engine, **lax, checkpoint__every=3) for name, engine in ENGINES.items()]
    runs += [settings(base, task, tmp_path / f"{name}_resumed", **ENGINES[name], **lax,  # from adapters-only checkpoints
                      checkpoint__resume=tmp_path / name / "checkpoints" / "step_00000003",
                      checkpoint__trust=name == "zero2")  # DeepSpeed's files are pickles: trusted explicitly
             for name in ("fsdp", "zero2")]
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]  # DeepSpeed's ninja: see test_engines
    run_command([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                 "--master_port", str(free_port()), str(RUNS_SCRIPT), str(spec)], env={"PATH": path})
    reference = losses(single)
    for name in ENGINES:
        got = losses(tmp_path / name)
        assert sorted(got) == sorted(reference) == list(range(1, 7))
        assert all(got[s] == pytest.approx(reference[s], rel=1e-5) for s in got), (name, got, reference)
    one, _, _ = load_finetuned(single)
    with torch.no_grad(), trust.trusting(tmp_path):  # our own DeepSpeed checkpoints
        expected = one(TOKENS)
        for name in ("fsdp", "zero2"):  # sharded checkpoints of the adapters only, consolidated, on their base
            torch.testing.assert_close(load_finetuned(tmp_path / name)[0](TOKENS), expected, rtol=1e-4, atol=1e-4)
    from megatron_lax.training.checkpoint import resolve_checkpoint_dir
    from megatron_lax.parallel import consolidated_state_dict
    for name in ("fsdp", "zero2"):
        with trust.trusting(tmp_path):
            saved = consolidated_state_dict(resolve_checkpoint_dir(tmp_path / name))
        assert saved and all(".adapter." in k for k in saved), (name, [k for k in saved if ".adapter." not in k][:3])
        resumed, full = losses(tmp_path / f"{name}_resumed"), losses(tmp_path / name)
        assert sorted(resumed) == [4, 5, 6] and all(resumed[s] == pytest.approx(full[s], rel=1e-6) for s in resumed)


def test_a_hugging_face_base_loads_shard_by_shard_on_fsdp2_and_zero3_and_trains_as_on_one_process(base, task,
                                                                                                   tmp_path):
    pytest.importorskip("transformers")
    hf = hf_export(base, tmp_path / "hf")
    lax = {"lora__lax_gate": "linear", "train__micro_batch": 2}
    trainer(hf, task, tmp_path / "single", **lax).fit()
    engines = {"fsdp": {"parallel__engine": "fsdp"}, "zero3": {"parallel__engine": "deepspeed", "parallel__zero_stage": 3}}
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps([settings(hf, task, tmp_path / name, **engine, **lax) for name, engine in engines.items()]))
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]
    run_command([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                 "--master_port", str(free_port()), str(RUNS_SCRIPT), str(spec)], env={"PATH": path})
    reference = losses(tmp_path / "single")
    for name in engines:  # built on meta (inside zero.Init for ZeRO-3), each tensor read once and sharded
        got = losses(tmp_path / name)
        assert sorted(got) == sorted(reference) and all(got[s] == pytest.approx(reference[s], rel=1e-5) for s in got)
        assert load_config(str(tmp_path / name / "config.yaml")).finetune.base_fingerprint == \
            load_config(str(tmp_path / "single" / "config.yaml")).finetune.base_fingerprint


# --- bases and bad input ------------------------------------------------------------------------------

def hf_export(base: Path, out: Path) -> Path:
    export(base, out)
    return out


@pytest.mark.parametrize("full", [False, True])
def test_a_hugging_face_base_built_on_meta_and_filled_tensor_by_tensor_equals_the_eager_load(base, task, tmp_path,
                                                                                             full):
    """What FSDP2 and ZeRO-3 fine-tunes get from finetune_recipe (here on one process, unsharded)."""
    from megatron_lax.models.lora import apply_lora
    from megatron_lax.loading.bases import base_fingerprint
    from megatron_lax.loading.finetuned import finetune_recipe
    from megatron_lax.parallel import materialize
    hf = hf_export(base, tmp_path / "hf")
    cfg = load_config(None, settings(hf, task, tmp_path / "run", lora__lax_gate="linear", finetune__full=full))
    model_cfg, recipe = finetune_recipe(cfg)
    with torch.device("meta"):
        model = recipe.build()
    assert all(p.is_meta for p in model.parameters())
    materialize(model, recipe.initialize, torch.device("cpu"))
    eager = load_base(str(hf))
    assert cfg.finetune.base_fingerprint == base_fingerprint(eager.named_parameters())
    if not full:
        eager = apply_lora(eager, cfg.lora, seed=cfg.train.seed)
    assert model_cfg == eager.cfg and model.state_dict().keys() == eager.state_dict().keys()
    assert all(torch.equal(v, eager.state_dict()[k]) for k, v in model.state_dict().items())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [n for n, p in eager.named_parameters() if p.requires_grad]


def test_bases_of_every_kind_load_as_the_same_dense_model(prepared_sample, base, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = load_base(str(base))
    hf_dir = hf_export(base, tmp_path / "hf")
    sharded = tmp_path / "sharded"
    transformers.LlamaForCausalLM.from_pretrained(hf_dir).save_pretrained(sharded, max_shard_size="300KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    tied = tmp_path / "tied"
    tied.mkdir()
    config = json.loads((hf_dir / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    from safetensors.torch import load_file, save_file
    weights = load_file(str(hf_dir / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if k != "lm_head.weight"}, str(tied / "model.safetensors"))
    svd = pretrained(prepared_sample, tmp_path / "svd", **{"model.method": "svd"})
    svd_model, _, _ = load_model(svd, torch.device("cpu"))
    with torch.no_grad():
        expected = ours(TOKENS)
        for other in (hf_dir, sharded):
            torch.testing.assert_close(load_base(str(other))(TOKENS), expected, rtol=1e-5, atol=1e-5)
        tied_model = load_hf_llama(tied)
        assert torch.equal(tied_model.lm_head.weight, tied_model.embed.weight)
        torch.testing.assert_close(load_base(str(svd))(TOKENS), svd_model(TOKENS), rtol=1e-4, atol=1e-4)


def one_line_error(capsys, overrides: dict) -> str:
    assert main([a for k, v in overrides.items() for a in (f"--{k}", v)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_bad_bases_and_adapters_that_do_not_fit_fail_in_one_line(prepared_sample, base, task, tmp_path, capsys):
    assert "no such directory" in one_line_error(capsys, settings(tmp_path / "missing", task, tmp_path / "a"))
    assert "no intact checkpoint" in one_line_error(capsys, settings(tmp_path, task, tmp_path / "b"))
    assert "lora.rank 100 is larger than the q projection allows (64 -> 64)" in one_line_error(
        capsys, settings(base, task, tmp_path / "c", lora__rank=100))
    gqa = hf_export(base, tmp_path / "gqa")
    config = json.loads((gqa / "config.json").read_text())
    (gqa / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4, "num_key_value_heads": 3}))
    assert "num_key_value_heads 3 does not divide num_attention_heads 4" in one_line_error(
        capsys, settings(gqa, task, tmp_path / "d"))
    (gqa / "config.json").write_text(json.dumps({**config, "rope_scaling": {"type": "linear", "factor": 2.0}}))
    assert "rope_scaling" in one_line_error(capsys, settings(gqa, task, tmp_path / "e"))
    (gqa / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    assert "do not fit a LLaMA of 3 layers" in one_line_error(capsys, settings(gqa, task, tmp_path / "f"))
    cola = pretrained(prepared_sample, tmp_path / "cola", **{"model.method": "cola", "train.steps": 1})
    assert "is a CoLA model: LoRA needs plain linear projections" in one_line_error(
        capsys, settings(cola, task, tmp_path / "g"))
    assert "train.json: cannot read it" in one_line_error(capsys, settings(base, tmp_path, tmp_path / "h"))


def test_a_fine_tuning_run_is_refused_as_a_base(lora_run, task, tmp_path, capsys):
    assert "is a fine-tuning run; export it with --merge" in one_line_error(capsys, settings(lora_run, task, tmp_path))


def test_broken_training_records_are_skipped_counted_and_reported(base, task, tmp_path, capsys):
    records = json.loads((task / "train.json").read_text())
    broken = tmp_path / "train.json"
    broken.write_text(json.dumps(records[:80] + [{"instruction": 3, "output": "x"}, {"output": ""}, "text"])[:-1]
                      + ', {"instruction": "cut')
    assert main([a for k, v in settings(base, tmp_path, tmp_path / "run", train__steps=1).items()
                 for a in (f"--{k}", v)]) == 0
    assert "train.json: skipped 4 records (broken_json 1, not_an_object 1, missing_field 1, not_a_string 1)" \
        in capsys.readouterr().out


# --- exports --------------------------------------------------------------------------------------------

def test_plain_lora_exports_to_peft_and_merges_into_the_base(lora_run, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    ours, _, _ = load_finetuned(lora_run)
    assert export_finetuned(lora_run, tmp_path / "adapter") == "peft"
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"] and config["r"] == 4
    hf_base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "adapter" / "base")
    theirs = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    assert export_finetuned(lora_run, tmp_path / "merged", merge=True) == "huggingface (merged)"
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        expected = ours(TOKENS)
        assert not torch.allclose(expected, load_base(str(tmp_path / "adapter" / "base"))(TOKENS))  # B moved off 0
        torch.testing.assert_close(theirs(TOKENS).logits, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(merged(TOKENS).logits, expected, rtol=1e-4, atol=1e-4)


def test_lax_lora_exports_in_our_format_and_refuses_to_merge(lax_run, tmp_path):
    ours, _, _ = load_finetuned(lax_run)
    assert export_finetuned(lax_run, tmp_path / "lax", fmt="megatron_lax") == "megatron_lax LaX-LoRA"
    loaded = load_lax_lora(tmp_path / "lax")
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), ours(TOKENS))
    with pytest.raises(ValueError, match="cannot be merged"):
        export_finetuned(lax_run, tmp_path / "merged", merge=True)


def test_lax_lora_exports_as_one_transformers_model(lax_run, tmp_path):
    """By default the base and its LaX-LoRA adapters are one transformers model (remote code)."""
    transformers = pytest.importorskip("transformers")
    ours, _, _ = load_finetuned(lax_run)
    assert export_finetuned(lax_run, tmp_path / "lax_hf") == "transformers (remote code, base and LaX-LoRA adapters)"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lax_hf", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(TOKENS).logits, ours(TOKENS), rtol=1e-5, atol=1e-5)


# --- evaluation -------------------------------------------------------------------------------------

def test_evaluate_command_writes_accuracy_for_a_run_and_for_its_base(lora_run, base, task, tmp_path, capsys):
    from megatron_lax import finetune_eval
    out = tmp_path / "acc.json"
    assert finetune_eval.main(["evaluate", "--checkpoint", str(lora_run), "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["method"] == "LoRA" and report["trainable"] == 6144 and report["seed"] == 0
    test, = report["files"]
    assert test["n"] == 10 and 0 <= test["accuracy"] <= 1 and len(test["examples"]) == 10
    assert report["bos"] is False and test["num_beams"] == 4  # our base: no BOS; LLM-Adapters' 4 beams
    assert finetune_eval.main(["evaluate", "--base", str(base), "--test", str(task / "test.json"), "--output",
                               str(tmp_path / "base.json")]) == 0
    assert json.loads((tmp_path / "base.json").read_text())["method"] == "base"
    assert finetune_eval.main(["table", str(out), str(tmp_path / "base.json")]) == 0
    assert "| LoRA | 1 |" in capsys.readouterr().out
    assert finetune_eval.main(["evaluate", "--base", str(tmp_path / "nothing"), "--test", "x.json"]) == 2
    assert capsys.readouterr().err.strip() == f"error: finetune.base {tmp_path / 'nothing'}: no such directory"
