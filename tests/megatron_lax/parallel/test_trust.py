"""Nothing a user is handed is unpickled unless they say they trust it, and trust never follows a
folder: a payload (an object whose unpickling would create a marker directory) planted in each file a
loader reads, with the manifest's checksums rewritten as whoever crafts the file would, never runs,
whether the checkpoint is handed by path, sits in the run's own folder (a copied run resumed with
`auto`) or under the new run's directory; the user gets one line naming the flag. What the runs
write loads without unpickling; a checkpoint written before RNG states were plain data resumes with
the flag only; DeepSpeed's pickled files are read from a checkpoint the run proves it wrote (a key
outside the run folder signs its manifest), which a copied folder fails."""
from __future__ import annotations

import io
import json
import os
import pickle
import random
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
                         for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in (checkpoint.MANIFEST, trust.SIGNATURE)}
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


def copied_run(run: Path, target: Path) -> Path:
    """The run folder copied to target, its config.yaml naming the new place (B of the issue)."""
    shutil.copytree(run, target, ignore=shutil.ignore_patterns(checkpoint.LOCK))
    text = (target / "config.yaml").read_text().replace(f"run_dir: {run}", f"run_dir: {target}")
    (target / "config.yaml").write_text(text)
    return target


@pytest.mark.parametrize("where", ["handed", "own_folder", "under_the_run_dir"])
@pytest.mark.parametrize("place", ["rank_00000.pt", "model.pt", "optimizer.pt"])
def test_a_payload_in_a_checkpoint_does_not_run_on_resume(prepared_sample, run, tmp_path, capsys, place, where):
    """P1 (the copied run's own folder, resume auto), P3 (a checkpoint under the new run's folder,
    resumed by path) and a checkpoint handed by path."""
    from megatron_lax.train import main
    marker, run_dir = tmp_path / "marker", tmp_path / "mine"
    if where == "handed":
        handed, resume = crafted(run, tmp_path), None
    elif where == "own_folder":
        run_dir = copied_run(run, tmp_path / "B")
        handed, resume = run_dir / "checkpoints" / "step_00000002", "auto"
    else:
        handed = crafted(run, run_dir / "p2" / "checkpoints")
        resume = handed
    plant(handed / place, marker)
    reseal(handed)
    code = main(["--config", "llama_tiny", *as_cli(overrides(prepared_sample, run_dir, train__steps=3,
                                                             checkpoint__resume=resume or handed))])
    assert code == 2 and not marker.exists()
    assert refused(one_error_line(capsys), handed / place)


def test_a_random_bytes_model_file_is_unreadable_not_pickled(run, tmp_path, capsys):
    from megatron_lax import evaluate
    handed = crafted(run, tmp_path)
    (handed / "model.pt").write_bytes(random.Random(0).randbytes(4096))
    reseal(handed)
    assert evaluate.main(["--checkpoint", str(handed)]) == 2
    line = one_error_line(capsys)
    assert f"{handed / 'model.pt'}: not a readable PyTorch file" in line
    assert "pickled" not in line and FLAG not in line


@pytest.mark.parametrize("head", [b"", b"PK\x03\x04", b"\x80\x02"], ids=["random", "zip-header", "pickle-header"])
def test_damaged_bytes_of_any_kind_are_one_clear_error(tmp_path, head):
    """The weights-only unpickler meets damaged bytes with errors of many types (IndexError, KeyError,
    struct.error, ...): each must come out as the loader's one-line error, whatever the bytes hold."""
    rng = random.Random(len(head))
    for i in range(300):
        path = tmp_path / f"{i}.pt"
        path.write_bytes(head + rng.randbytes(rng.randrange(4096)))
        with pytest.raises(ValueError) as caught:
            trust.load_tensors(path)
        message = str(caught.value)
        assert "\n" not in message and message.startswith(str(path))
        if not head and not isinstance(caught.value, trust.UntrustedFile):
            assert "not a readable PyTorch file" in message


@pytest.mark.parametrize("content,why", [(b"", "empty or cut short"),
                                         (b"step,loss\n1,2.5\n", "neither a zip archive nor a pickle")])
def test_a_file_that_is_no_torch_file_is_named_as_such(tmp_path, content, why):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"^{path}: not a readable PyTorch file \({why}"):
        trust.load_tensors(path)


def test_damaged_bytes_in_a_restricted_pickle_are_one_clear_error(tmp_path):
    rng = random.Random(1)
    for i in range(300):
        path = tmp_path / f"{i}.metadata"
        path.write_bytes(b"\x80\x04" + rng.randbytes(rng.randrange(4096)))
        with pytest.raises(ValueError) as caught:
            trust.restricted_load(path, {"collections": {"OrderedDict"}}, "checkpoint metadata")
        assert "\n" not in str(caught.value) and str(caught.value).startswith(str(path))


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


# --- DCP (FSDP2): a real checkpoint of a real 2-rank FSDP2 run ---------------------------------------------------

@pytest.fixture(scope="module")
def fsdp_run(prepared_sample, tmp_path_factory) -> Path:
    import sys

    from conftest import REPO
    sys.path.insert(0, str(REPO / "tests" / "megatron_lax" / "parallel"))
    from train_runs import launch
    out = tmp_path_factory.mktemp("fsdp")
    launch([{"overrides": overrides(prepared_sample, out / "run", parallel__engine="fsdp")}], out, nproc=2)
    return out / "run"


def dcp_metadata(handed: Path):
    return pickle.loads((handed / "dcp" / ".metadata").read_bytes())  # the test's own file: trusted


def plant_in_dcp(handed: Path, marker: Path, place: str) -> None:
    """The payload as the checkpoint's DCP metadata, or as one of its pickled values (appended to a
    data file, the metadata pointed at it), or a storage path leaving the checkpoint."""
    import dataclasses

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    metadata_path = handed / "dcp" / ".metadata"
    if place == "metadata":
        metadata_path.write_bytes(pickle.dumps(Payload(marker)))
    else:
        metadata = dcp_metadata(handed)
        index, info = next((i, v) for i, v in metadata.storage_data.items()
                           if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata))
        if place == "value":
            data = handed / "dcp" / info.relative_path
            payload = io.BytesIO()
            torch.save(Payload(marker), payload)
            offset = data.stat().st_size
            data.write_bytes(data.read_bytes() + payload.getvalue())
            metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(payload.getvalue()))
        else:
            metadata.storage_data[index] = dataclasses.replace(info, relative_path="../../../outside.distcp")
        metadata_path.write_bytes(pickle.dumps(metadata))
    reseal(handed)


def full_dcp_load(handed: Path) -> None:
    """What FSDPEngine.load (resume) does: every value of the checkpoint, through our reader and planner."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from megatron_lax.parallel import fsdp
    reader, planner = fsdp.dcp_reading(handed)
    template = {}
    for fqn, meta in reader.metadata.state_dict_metadata.items():
        template[fqn] = None if isinstance(meta, BytesStorageMetadata) else torch.empty(meta.size, dtype=meta.properties.dtype)
    fsdp.reading_errors_unwrapped(lambda: dcp.load(template, storage_reader=reader, planner=planner, no_dist=True))


@pytest.mark.parametrize("place", ["metadata", "value"])
def test_a_payload_in_dcp_files_does_not_run(fsdp_run, tmp_path, capsys, place):
    """P2: in the run's own folder, with the flag even: the DCP reader never falls back to pickle."""
    from megatron_lax import evaluate
    run_dir = copied_run(fsdp_run, tmp_path / "B")
    handed, marker = run_dir / "checkpoints" / "step_00000002", tmp_path / "marker"
    plant_in_dcp(handed, marker, place)
    if place == "metadata":
        assert evaluate.main(["--checkpoint", str(run_dir), "--trust-checkpoint"]) == 2 and not marker.exists()
        line = one_error_line(capsys)
        assert f"{handed / 'dcp' / '.metadata'} holds DCP metadata that is not plain data" in line
    with trust.trusting(run_dir, everything=True), pytest.raises(trust.UntrustedFile, match="never writes"):
        full_dcp_load(handed)
    assert not marker.exists()


def test_a_dcp_storage_path_outside_the_checkpoint_is_refused(fsdp_run, tmp_path):
    from megatron_lax.parallel import fsdp
    handed = crafted(fsdp_run, tmp_path)
    plant_in_dcp(handed, tmp_path / "marker", "path")
    with pytest.raises(ValueError, match="names a storage file outside the checkpoint"):
        fsdp.dcp_reading(handed)


def test_an_fsdp_checkpoint_of_plain_data_loads_without_the_flag(fsdp_run, tmp_path):
    from megatron_lax.parallel import consolidated_state_dict
    handed = crafted(fsdp_run, tmp_path)
    assert not (handed / "model.pt").exists() and (handed / "dcp" / ".metadata").is_file()
    state = consolidated_state_dict(handed)
    assert "embed.weight" in state and all(torch.isfinite(v).all() for v in state.values())
    full_dcp_load(handed)  # every value, the optimizer's included, as plain data


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


def test_an_old_checkpoint_resumes_with_the_flag_only_even_from_its_own_run_directory(prepared_sample, run, tmp_path,
                                                                                    capsys):
    from megatron_lax.train import main
    own = copied_run(run, tmp_path / "own")
    old_format(own / "checkpoints" / "step_00000002")
    settings = overrides(prepared_sample, own, train__steps=3, checkpoint__resume="auto")
    assert main(["--config", "llama_tiny", *as_cli(settings)]) == 2
    assert refused(one_error_line(capsys), own / "checkpoints" / "step_00000002" / "rank_00000.pt")
    settings["checkpoint.trust"] = "true"
    assert main(["--config", "llama_tiny", *as_cli(settings)]) == 0
    assert f"resumed from {own / 'checkpoints' / 'step_00000002'} at step 2" in capsys.readouterr().out


# --- where trust may come from: a proof, compared by resolved path ------------------------------------------------

def test_only_the_run_s_own_checkpoint_at_its_own_path_is_proven(run, tmp_path):
    own = run / "checkpoints" / "step_00000002"
    assert trust.proven(own)
    assert not trust.proven(crafted(run, tmp_path))  # the same bytes elsewhere
    sibling = copied_run(run, Path(f"{run}b"))  # a folder sharing the run's name as a prefix
    assert not trust.proven(sibling / "checkpoints" / "step_00000002")
    shutil.rmtree(sibling)
    tampered = copied_run(run, tmp_path / "tampered") / "checkpoints" / "step_00000002"
    shutil.copy(own / trust.SIGNATURE, tampered / trust.SIGNATURE)  # the signature follows the copy: still no proof
    assert not trust.proven(tampered)


def test_trust_in_a_folder_compares_resolved_paths(tmp_path):
    a, ab = tmp_path / "runs" / "a", tmp_path / "runs" / "ab"
    for folder in (a, ab):
        folder.mkdir(parents=True)
        (folder / "f.pt").write_text("x")
    (a / "link.pt").symlink_to(ab / "f.pt")
    with trust.trusting(a):
        assert trust.is_trusted(a / "f.pt")
        assert not trust.is_trusted(ab / "f.pt")  # a string-prefix check would trust it
        assert not trust.is_trusted(a / "link.pt")
        assert not trust.is_trusted(a / ".." / "ab" / "f.pt")
    assert not trust.is_trusted(a / "f.pt")
