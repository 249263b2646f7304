"""Evaluation, export and generation from real checkpoints."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import TINY, run_command, torchrun
from megatron_lax import load_pretrained
from megatron_lax.config import load_config
from megatron_lax.evaluate import load_model
from megatron_lax.export import export
from megatron_lax.generate import generate
from megatron_lax.train import make_trainer


def trained(prepared, run_dir, **extra):
    values = {**TINY, "train.steps": 3, "optim.lr": 1e-2, "data.path": str(prepared),
              "logging.run_dir": str(run_dir), **extra}
    make_trainer(load_config("llama_tiny", {k: str(v) for k, v in values.items()})).fit()
    return run_dir


@pytest.mark.parametrize("method", ["dense", "svd"])
def test_hugging_face_export_matches_our_logits(prepared_sample, tmp_path, method):
    transformers = pytest.importorskip("transformers")
    run_dir = trained(prepared_sample, tmp_path / "run", **{"model.method": method})
    assert export(run_dir, tmp_path / "hf") == "huggingface"
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours, _, _ = load_model(run_dir, torch.device("cpu"))
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)
    assert (tmp_path / "hf" / "tokenizer" / "tokenizer.model").is_file()


@pytest.mark.parametrize("method,gate", [("svd", "identity"), ("cola", "none"), ("cola", "tensor")])
def test_lax_and_cola_export_in_our_format(prepared_sample, tmp_path, method, gate):
    run_dir = trained(prepared_sample, tmp_path / "run", **{"model.method": method, "model.lax_gate": gate})
    assert export(run_dir, tmp_path / "out", fmt="megatron_lax") == "megatron_lax"
    loaded = load_pretrained(tmp_path / "out")
    ours, _, _ = load_model(run_dir, torch.device("cpu"))
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), ours(tokens))
    with pytest.raises(ValueError, match="not a megatron_lax export"):
        load_pretrained(tmp_path)


def test_lax_export_is_a_transformers_model_our_loaders_do_not_run(prepared_sample, tmp_path):
    """The command's default for a LaX model: a transformers folder (remote code) with our logits;
    our own loaders refuse it in one line and never run its modeling file."""
    from transformers import AutoModelForCausalLM
    from megatron_lax.evaluate import load_for_evaluation
    from megatron_lax.export import main
    from megatron_lax.loading.bases import load_base
    run_dir = trained(prepared_sample, tmp_path / "run", **{"model.method": "svd", "model.lax_gate": "identity"})
    assert main(["--checkpoint", str(run_dir), "--output", str(tmp_path / "hf")]) == 0
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    ours, _, _ = load_model(run_dir, torch.device("cpu"))
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=1e-5, atol=1e-5)
    assert "3 steps" in (tmp_path / "hf" / "README.md").read_text()
    modeling = tmp_path / "hf" / "modeling_megatron_lax.py"
    modeling.write_text(f"open({str(tmp_path / 'ran')!r}, 'w')\n" + modeling.read_text())
    for load in (load_pretrained, load_base):
        with pytest.raises(ValueError):
            load(str(tmp_path / "hf"))
    read, _, _, step = load_for_evaluation(tmp_path / "hf", torch.device("cpu"))  # as tensors, for evaluate
    with torch.no_grad():
        assert step == 3 and torch.equal(read(tokens), ours(tokens))
    assert not (tmp_path / "ran").exists()
    assert main(["--checkpoint", str(run_dir), "--output", str(tmp_path / "hf")]) == 2  # not empty: refused


def test_evaluation_is_the_same_on_one_and_two_processes(prepared_sample, tmp_path):
    run_dir = trained(prepared_sample, tmp_path / "run", **{"model.method": "svd", "model.lax_gate": "identity"})
    one = json.loads(run_command([sys.executable, "-m", "megatron_lax.evaluate", "--checkpoint", str(run_dir),
                                  "--json"]).stdout.strip().splitlines()[-1])
    two = json.loads(torchrun(["-m", "megatron_lax.evaluate", "--checkpoint", str(run_dir), "--json",
                               "--micro-batch", "3"]).stdout.strip().splitlines()[-1])
    assert one["tokens"] == two["tokens"] == 4096 and one["sequences"] == two["sequences"] == 128
    assert two["val_ppl"] == pytest.approx(one["val_ppl"], rel=1e-9)
    assert one["ppl_low"] < one["val_ppl"] < one["ppl_high"]
    final = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_ppl" in l][-1]
    assert one["val_ppl"] == pytest.approx(final["val_ppl"], rel=1e-6)  # what the trainer reported


def test_generation_greedy_and_top1_agree(prepared_sample, tmp_path):
    run_dir = trained(prepared_sample, tmp_path / "run", **{"model.method": "cola", "model.lax_gate": "identity"})
    model, _, _ = load_model(run_dir, torch.device("cpu"))
    greedy = generate(model, [5, 6, 7], 12, greedy=True)
    sampled = generate(model, [5, 6, 7], 12, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(3))
    assert len(greedy) == 12 and greedy == sampled
    out = run_command([sys.executable, "-m", "megatron_lax.generate", "--checkpoint", str(run_dir), "--prompt",
                       "The weather", "--max-new-tokens", "5", "--greedy"]).stdout
    assert out.startswith("The weather")


@pytest.fixture(scope="module")
def dense_run(prepared_sample, tmp_path_factory):
    return trained(prepared_sample, tmp_path_factory.mktemp("dense") / "run")


def test_export_refuses_a_non_empty_folder_and_force_replaces_it_whole(prepared_sample, dense_run, tmp_path, capsys):
    from megatron_lax.export import main
    out = tmp_path / "out"
    assert main(["--checkpoint", str(dense_run), "--output", str(out)]) == 0  # Hugging Face: config.json
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    lax_run = trained(prepared_sample, tmp_path / "lax", **{"model.method": "svd", "model.lax_gate": "identity"})
    assert main(["--checkpoint", str(lax_run), "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --output {out} is not empty; choose a new directory, or pass --force to replace what it holds"]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main(["--checkpoint", str(lax_run), "--output", str(out), "--force", "--format", "megatron_lax"]) == 0
    assert not (out / "config.json").exists()  # nothing of the earlier export is left beside the new one
    assert load_pretrained(out).cfg.lax_gate == "identity"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lax", "out"]  # no staging folder left


def test_an_export_that_fails_leaves_the_output_as_it_was(dense_run, tmp_path, monkeypatch):
    from megatron_lax import export as export_module
    out = tmp_path / "out"
    out.mkdir()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(export_module, "write_huggingface", disk_full)
    with pytest.raises(OSError):
        export(dense_run, out)
    assert list(tmp_path.iterdir()) == [out] and not any(out.iterdir())


def test_export_copies_the_tokenizer_s_own_files_and_no_symlink(prepared_sample, tmp_path):
    from conftest import REPO
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "id_rsa").write_text("PRIVATE KEY")
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.model").write_bytes((REPO / "tokenizer" / "sample" / "tokenizer.model").read_bytes())
    (tokenizer / "keys").symlink_to(secrets)
    (tokenizer / "tokenizer.json").symlink_to(secrets / "id_rsa")
    (tokenizer / "notes.txt").write_text("not part of the tokenizer")
    run_dir = trained(prepared_sample, tmp_path / "run", **{"data.tokenizer": str(tokenizer)})
    export(run_dir, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "tokenizer").iterdir()) == ["tokenizer.model"]
    assert not any("PRIVATE KEY" in p.read_text(errors="ignore") for p in (tmp_path / "out").rglob("*") if p.is_file())


def test_a_damaged_or_misfit_checkpoint_named_directly_is_one_line(dense_run, tmp_path, capsys):
    import shutil

    from megatron_lax import evaluate, export as export_module
    from megatron_lax.training.checkpoint import MANIFEST, sha256
    ckpt = tmp_path / "step_00000003"
    shutil.copytree(dense_run / "checkpoints" / "step_00000003", ckpt)
    model = ckpt / "model.pt"
    model.write_bytes(model.read_bytes()[:1000])  # truncated
    for tool, extra in ((evaluate.main, []), (export_module.main, ["--output", str(tmp_path / "out")])):
        assert tool(["--checkpoint", str(ckpt), *extra]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"error: checkpoint {ckpt} is damaged: truncated file model.pt"]
    state = torch.load(dense_run / "checkpoints" / "step_00000003" / "model.pt", weights_only=True)
    state["embed.weight"] = state["embed.weight"][:, :32]  # another shape, with a manifest that agrees
    torch.save(state, model)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"]["model.pt"] = {"bytes": model.stat().st_size, "sha256": sha256(model)}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    assert evaluate.main(["--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {ckpt}: the weights do not fit its config.yaml (size "
                                               f"mismatch for embed.weight")


@pytest.mark.parametrize("where", ["the_run", "inside_it", "its_parent", "the_checkpoint"])
def test_export_refuses_an_output_that_overlaps_the_run_force_or_not(dense_run, capsys, where):
    from megatron_lax.export import main
    before = sorted(p for p in dense_run.parent.rglob("*"))
    output = {"the_run": dense_run, "inside_it": dense_run / "export", "its_parent": dense_run.parent,
              "the_checkpoint": dense_run / "checkpoints"}[where]
    assert main(["--checkpoint", str(dense_run / "checkpoints" / "step_00000003"), "--output", str(output),
                 "--force"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --output {output} overlaps {dense_run}, the run being exported (it is, is inside or contains it); "
        f"choose a directory outside it"]
    assert sorted(p for p in dense_run.parent.rglob("*")) == before


def test_a_tokenizer_named_as_a_single_file_is_copied_only_if_it_is_a_tokenizer_file(dense_run, tmp_path, capsys):
    """P4: a checkpoint whose config names a private key as data.tokenizer; the key is not copied."""
    import shutil

    from megatron_lax.config import dump_yaml
    from megatron_lax.export import main
    key = tmp_path / "id_rsa"
    key.write_text("PRIVATE KEY")
    handed = tmp_path / "handed"
    shutil.copytree(dense_run / "checkpoints" / "step_00000003", handed)
    cfg = load_config(str(handed / "config.yaml"), {"data.tokenizer": str(key)})
    (handed / "config.yaml").write_text(dump_yaml(cfg))
    reseal(handed)
    assert main(["--checkpoint", str(handed), "--output", str(tmp_path / "out")]) == 0
    assert f"note: not copying {key} into the export: not a tokenizer file" in capsys.readouterr().err
    assert not (tmp_path / "out" / "tokenizer").exists()
    assert not any("PRIVATE KEY" in p.read_text(errors="ignore") for p in (tmp_path / "out").rglob("*") if p.is_file())


def reseal(directory) -> None:
    from megatron_lax.training import checkpoint
    manifest = json.loads((directory / checkpoint.MANIFEST).read_text())
    manifest["files"] = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": checkpoint.sha256(p)}
                         for p in sorted(directory.rglob("*")) if p.is_file()
                         and p.name not in (checkpoint.MANIFEST, "manifest.sig")}
    (directory / checkpoint.MANIFEST).write_text(json.dumps(manifest))


def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(dense_run, tmp_path):
    """D5: the real command under a file-size limit (the write fails as on a full disk)."""
    import resource
    import subprocess

    from conftest import REPO
    out = tmp_path / "out"
    limit = 64 * 1024  # smaller than the weights, larger than anything else the command writes

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    result = subprocess.run([sys.executable, "-m", "megatron_lax.export", "--checkpoint", str(dense_run),
                             "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                            preexec_fn=small_files)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: could not write the export to {out} (") \
        and lines[0].endswith("; it is as it was"), result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
