"""Nothing a user is handed is unpickled unless they say they trust it: a payload (an object whose
unpickling would create a marker directory) planted in each file a loader reads, with the manifest's
checksums rewritten as whoever crafts the file would, never runs; the user gets one line naming the
flag. What the runs write loads without unpickling, and a checkpoint written before RNG states were
plain data still resumes from its own run directory or with the flag."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY
from megatron_lax.parallel import trust
from megatron_lax.training import checkpoint
from megatron_lax.config import dump_yaml, load_config
from megatron_lax.train import make_trainer

FLAG = "--trust-checkpoint"


class Payload:
    """Unpickling it creates `marker` (a directory): code of the file's choosing ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def reseal(directory: Path) -> None:
    """Rewrites the manifest's sizes and checksums to fit the files, as a crafted checkpoint would."""
    manifest = json.loads((directory / checkpoint.MANIFEST).read_text())
    manifest["files"] = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": checkpoint.sha256(p)}
                         for p in sorted(directory.rglob("*")) if p.is_file() and p.name != checkpoint.MANIFEST}
    (directory / checkpoint.MANIFEST).write_text(json.dumps(manifest))


def overrides(prepared, run_dir, **extra) -> dict:
    values = {**TINY, "train.steps": 2, "optim.lr": 1e-2, "data.path": str(prepared), "logging.run_dir": str(run_dir),
              "logging.lax_stats_every": 0, **extra}
    return {k.replace("__", "."): str(v) for k, v in values.items()}


def as_cli(values: dict) -> list[str]:
    return [arg for key, value in values.items() for arg in (f"--{key}", value)]


@pytest.fixture(scope="module")
def run(prepared_sample, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    make_trainer(load_config("llama_tiny", overrides(prepared_sample, run_dir))).fit()
    return run_dir


def crafted(run: Path, tmp_path: Path) -> Path:
    """A copy of the run's checkpoint, away from the run."""
    target = tmp_path / "handed" / "step_00000002"
    shutil.copytree(run / "checkpoints" / "step_00000002", target)
    return target


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def refused(line: str, where) -> bool:
    return FLAG in line and "can run code" in line and str(where) in line


# --- what we write loads without unpickling -------------------------------------------------------------

def test_every_file_a_checkpoint_holds_loads_with_weights_only(run):
    files = list((run / "checkpoints" / "step_00000002").glob("*.pt"))
    assert {p.name for p in files} == {"model.pt", "optimizer.pt", "rank_00000.pt"}
    for path in files:
        torch.load(path, weights_only=True)


# --- payloads in our own formats -----------------------------------------------------------------------

def plant(path: Path, marker: Path, keep_keys: bool = True) -> None:
    """Replaces a torch file by one whose every value unpickles into the payload."""
    state = torch.load(path, weights_only=True)
    torch.save({k: Payload(marker) for k in state} if keep_keys else Payload(marker), path)


@pytest.mark.parametrize("place", ["rank_00000.pt", "model.pt", "optimizer.pt"])
def test_a_payload_in_a_checkpoint_does_not_run_on_resume(prepared_sample, run, tmp_path, capsys, place):
    from megatron_lax.train import main
    handed, marker = crafted(run, tmp_path), tmp_path / "marker"
    plant(handed / place, marker)
    reseal(handed)
    code = main(["--config", "llama_tiny", *as_cli(overrides(prepared_sample, tmp_path / "mine", train__steps=3,
                                                             checkpoint__resume=handed))])
    assert code == 2 and not marker.exists()
    assert refused(one_error_line(capsys), handed / place)


@pytest.mark.parametrize("tool", ["evaluate", "export", "generate"])
def test_a_payload_in_model_pt_does_not_run_in_the_tools(run, tmp_path, capsys, tool):
    from megatron_lax import evaluate, export, generate
    handed, marker = crafted(run, tmp_path), tmp_path / "marker"
    plant(handed / "model.pt", marker)
    reseal(handed)
    args = {"evaluate": (evaluate.main, []), "export": (export.main, ["--output", str(tmp_path / "out")]),
            "generate": (generate.main, ["--prompt", "The"])}[tool]
    assert args[0](["--checkpoint", str(handed), *args[1]]) == 2 and not marker.exists()
    assert refused(one_error_line(capsys), handed / "model.pt")
    assert not (tmp_path / "out").exists()


# --- DCP (FSDP2) -------------------------------------------------------------------------------------------

def as_fsdp(handed: Path, marker: Path, place: str) -> None:
    """Turns the copy into an FSDP2 checkpoint whose DCP metadata, or one of whose non-tensor values,
    is the payload."""
    import torch.distributed.checkpoint as dcp
    model = torch.load(handed / "model.pt", weights_only=True)
    for name in ("model.pt", "optimizer.pt"):
        (handed / name).unlink()
    cfg = load_config(str(handed / "config.yaml"), {"parallel.engine": "fsdp"})
    (handed / "config.yaml").write_text(dump_yaml(cfg))
    extra = {"note": Payload(marker)} if place == "value" else {}
    dcp.save({"model": {**model, **extra}}, checkpoint_id=str(handed / "dcp"), no_dist=True)
    if place == "metadata":
        (handed / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    reseal(handed)


@pytest.mark.parametrize("place", ["metadata", "value"])
def test_a_payload_in_dcp_files_does_not_run(run, tmp_path, capsys, place):
    import torch.distributed.checkpoint as dcp

    from megatron_lax import evaluate
    from megatron_lax.parallel import fsdp
    handed, marker = crafted(run, tmp_path), tmp_path / "marker"
    as_fsdp(handed, marker, place)
    assert evaluate.main(["--checkpoint", str(handed)]) == 2 and not marker.exists()
    assert refused(one_error_line(capsys), handed / "dcp")
    # the reader and planner of FSDPEngine.load (resume) refuse it the same way
    template = {"model": torch.load(crafted(run, tmp_path / "again") / "model.pt", weights_only=True)}
    if place == "value":
        template["model"]["note"] = "a string"
    with pytest.raises(trust.UntrustedFile, match=FLAG):
        reader, planner = fsdp.dcp_reading(handed)
        fsdp.reading_errors_unwrapped(lambda: dcp.load(template, storage_reader=reader, planner=planner,
                                                       no_dist=True))
    assert not marker.exists()


def test_an_fsdp_checkpoint_of_plain_data_loads_without_the_flag(run, tmp_path):
    from megatron_lax.parallel import consolidated_state_dict
    handed = crafted(run, tmp_path)
    expected = torch.load(handed / "model.pt", weights_only=True)
    as_fsdp(handed, tmp_path / "marker", place="none")
    state = consolidated_state_dict(handed)
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


# --- DeepSpeed: always pickled, so read only when trusted ------------------------------------------------------

def as_deepspeed(handed: Path, marker: Path) -> None:
    for name in ("model.pt", "optimizer.pt"):
        (handed / name).unlink()
    cfg = load_config(str(handed / "config.yaml"), {"parallel.engine": "deepspeed"})
    (handed / "config.yaml").write_text(dump_yaml(cfg))
    (handed / "deepspeed").mkdir()
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"module": Payload(marker)}, handed / "deepspeed" / name)
    (handed / "latest").write_text("deepspeed")
    reseal(handed)


@pytest.mark.parametrize("tool", ["evaluate", "export", "generate"])
def test_a_deepspeed_checkpoint_is_not_unpickled_without_the_flag(run, tmp_path, capsys, tool):
    from megatron_lax import evaluate, export, generate
    handed, marker = crafted(run, tmp_path), tmp_path / "marker"
    as_deepspeed(handed, marker)
    args = {"evaluate": (evaluate.main, []), "export": (export.main, ["--output", str(tmp_path / "out")]),
            "generate": (generate.main, ["--prompt", "The"])}[tool]
    assert args[0](["--checkpoint", str(handed), *args[1]]) == 2 and not marker.exists()
    line = one_error_line(capsys)
    assert refused(line, handed / "deepspeed") and "DeepSpeed" in line


def test_deepspeed_resume_reads_only_a_trusted_directory(run, tmp_path):
    from megatron_lax.parallel.deepspeed_engine import DeepSpeedEngine
    handed, marker = crafted(run, tmp_path), tmp_path / "marker"
    as_deepspeed(handed, marker)
    with pytest.raises(trust.UntrustedFile, match=FLAG):
        DeepSpeedEngine.load(None, handed)  # refused before DeepSpeed is touched
    with trust.trusting(tmp_path / "elsewhere"), pytest.raises(trust.UntrustedFile):
        DeepSpeedEngine.load(None, handed)
    assert not marker.exists()


# --- Hugging Face .bin and adapters -----------------------------------------------------------------------

def test_a_payload_in_a_hugging_face_bin_does_not_run(tmp_path, capsys):
    from megatron_lax import generate
    from megatron_lax.loading.huggingface import load_hf_llama
    hf, marker = tmp_path / "hf", tmp_path / "marker"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                                "num_attention_heads": 2, "intermediate_size": 128,
                                                "vocab_size": 512}))
    torch.save({"model.embed_tokens.weight": Payload(marker)}, hf / "pytorch_model.bin")
    with pytest.raises(trust.UntrustedFile, match=FLAG):
        load_hf_llama(hf)
    assert generate.main(["--checkpoint", str(hf), "--prompt", "The"]) == 2 and not marker.exists()
    assert refused(one_error_line(capsys), hf / "pytorch_model.bin")


def test_an_adapter_file_is_never_unpickled(run, tmp_path):
    from megatron_lax.loading.ours import LAX_LORA_FORMAT
    from megatron_lax.loading.finetuned import load_lax_lora
    export, marker = tmp_path / "adapters", tmp_path / "marker"
    export.mkdir()
    cfg = load_config(str(run / "config.yaml"), {"finetune.base": str(run), "lora.lax_gate": "identity"})
    (export / "config.yaml").write_text(dump_yaml(cfg))
    (export / LAX_LORA_FORMAT).write_text(json.dumps({"format": "megatron_lax_lora", "version": 1}))
    payload = pickle.dumps({"a": Payload(marker)})
    (export / "adapter_model.safetensors").write_bytes(payload)  # a pickle under the safetensors name
    (export / "adapter_model.bin").write_bytes(payload)  # and beside it, where PEFT would look
    with pytest.raises(ValueError) as error:
        load_lax_lora(export)
    assert "adapter_model.safetensors" in str(error.value) and "\n" not in str(error.value)
    assert not marker.exists()


# --- checkpoints written before RNG states were plain data --------------------------------------------------------

def old_format(handed: Path) -> None:
    """The rank file as checkpoints held it before: numpy's RNG state as a numpy tuple (unpickled)."""
    state = torch.load(handed / "rank_00000.pt", weights_only=True)
    state["rng"]["numpy"] = np.random.get_state()
    torch.save(state, handed / "rank_00000.pt")
    reseal(handed)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(handed / "rank_00000.pt", weights_only=True)


def test_an_old_checkpoint_resumes_from_its_own_run_directory_or_with_the_flag(prepared_sample, run, tmp_path, capsys):
    from megatron_lax.train import main
    own = tmp_path / "own"
    shutil.copytree(run, own)
    old_format(own / "checkpoints" / "step_00000002")
    settings = overrides(prepared_sample, own, train__steps=3, checkpoint__resume="auto")
    assert main(["--config", "llama_tiny", *as_cli(settings)]) == 0
    assert f"resumed from {own / 'checkpoints' / 'step_00000002'} at step 2" in capsys.readouterr().out

    handed = crafted(run, tmp_path)
    old_format(handed)
    settings = overrides(prepared_sample, tmp_path / "other", train__steps=3, checkpoint__resume=handed)
    assert main(["--config", "llama_tiny", *as_cli(settings)]) == 2
    assert refused(one_error_line(capsys), handed / "rank_00000.pt")
    settings["checkpoint.trust"] = "true"
    assert main(["--config", "llama_tiny", *as_cli(settings)]) == 0
    assert f"resumed from {handed} at step 2" in capsys.readouterr().out
