"""A run never deletes or replaces a checkpoint it did not write, never leaves `latest` naming a
missing folder and never mixes two runs' metrics: a second run in a directory that holds a run stops
with one line naming --checkpoint.overwrite (or resumes it with --checkpoint.resume auto), and
retention never deletes the checkpoint just written."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY
from megatron_lax.training import checkpoint
from megatron_lax.train import main

CKPT = "step_{:08d}".format


def train(prepared, run_dir, capsys, **extra) -> tuple[int, str, str]:
    values = {**TINY, "train.steps": 4, "optim.lr": 1e-2, "data.path": prepared, "logging.run_dir": run_dir,
              "logging.lax_stats_every": 0, "logging.log_every": 1, "checkpoint.every": 2, **extra}
    values = {k.replace("__", "."): str(v) for k, v in values.items()}
    code = main(["--config", "llama_tiny", *[a for k, v in values.items() for a in (f"--{k}", v)]])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def logged_steps(run_dir: Path) -> list[int]:
    """The steps of the training records in metrics.jsonl, in the order logged."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


def test_a_second_run_in_the_same_directory_stops_and_changes_nothing(prepared_sample, tmp_path, capsys):
    assert train(prepared_sample, tmp_path, capsys)[0] == 0
    before = snapshot(tmp_path)
    code, _, err = train(prepared_sample, tmp_path, capsys, optim__lr=3e-3, train__steps=2)
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: logging.run_dir {tmp_path} holds an earlier run (checkpoints/ up to {CKPT(4)}, metrics.jsonl, "
        f"finished.json, config.yaml); continue it with --checkpoint.resume auto, start over with "
        f"--checkpoint.overwrite true (deletes its checkpoints and logs), or choose another logging.run_dir"]
    assert snapshot(tmp_path) == before  # not a byte written


def test_overwrite_starts_over_and_a_shorter_run_keeps_its_only_checkpoint(prepared_sample, tmp_path, capsys):
    assert train(prepared_sample, tmp_path, capsys, train__steps=6)[0] == 0
    (tmp_path / "notes.txt").write_text("mine")  # not a run's output: never deleted
    code, out, _ = train(prepared_sample, tmp_path, capsys, optim__lr=3e-3, train__steps=2,
                         checkpoint__overwrite="true", checkpoint__every=0, checkpoint__keep=1)
    assert code == 0
    root = tmp_path / "checkpoints"
    assert [p.name for p in root.iterdir() if p.is_dir()] == [CKPT(2)]
    assert (root / "latest").read_text() == CKPT(2) and checkpoint.verify(root / CKPT(2)) is None
    assert f"checkpoint {root / CKPT(2)}" in out
    assert logged_steps(tmp_path) == [1, 2]  # the second run's only
    assert json.loads((tmp_path / "finished.json").read_text())["steps"] == 2
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_resume_auto_continues_the_directory_s_run(prepared_sample, tmp_path, capsys):
    assert train(prepared_sample, tmp_path, capsys, train__steps=2)[0] == 0
    code, out, _ = train(prepared_sample, tmp_path, capsys, checkpoint__resume="auto", train__steps=4)
    assert code == 0 and f"resumed from {tmp_path / 'checkpoints' / CKPT(2)} at step 2" in out
    assert logged_steps(tmp_path) == [1, 2, 3, 4]  # one run, continued


def test_resuming_an_earlier_checkpoint_of_the_run_would_replace_later_ones(prepared_sample, tmp_path, capsys):
    assert train(prepared_sample, tmp_path, capsys, train__steps=6, checkpoint__keep=3)[0] == 0
    root = tmp_path / "checkpoints"
    code, _, err = train(prepared_sample, tmp_path, capsys, train__steps=6, checkpoint__resume=root / CKPT(2))
    assert code == 2 and err.strip().splitlines() == [
        f"error: resuming {root / CKPT(2)} would replace the later checkpoints {CKPT(4)}, {CKPT(6)} of {tmp_path}; "
        f"continue from the newest with --checkpoint.resume auto, or delete the later ones with "
        f"--checkpoint.overwrite true"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", CKPT(2), CKPT(4), CKPT(6)]
    code, out, _ = train(prepared_sample, tmp_path, capsys, train__steps=3, checkpoint__resume=root / CKPT(2),
                         checkpoint__overwrite="true", checkpoint__every=0)
    assert code == 0 and "resumed from" in out
    assert sorted(p.name for p in root.iterdir()) == ["latest", CKPT(2), CKPT(3)]
    assert (root / "latest").read_text() == CKPT(3)


def test_resuming_another_run_s_checkpoint_into_a_used_directory_stops(prepared_sample, tmp_path, capsys):
    assert train(prepared_sample, tmp_path / "a", capsys, train__steps=2)[0] == 0
    assert train(prepared_sample, tmp_path / "b", capsys, train__steps=2)[0] == 0
    code, _, err = train(prepared_sample, tmp_path / "b", capsys,
                         checkpoint__resume=tmp_path / "a" / "checkpoints" / CKPT(2))
    assert code == 2 and "holds an earlier run" in err and len(err.strip().splitlines()) == 1


def make_checkpoints(root: Path, steps: list[int]) -> None:
    for step in steps:
        (root / CKPT(step)).mkdir(parents=True)
        (root / CKPT(step) / checkpoint.MANIFEST).write_text("{}")


@pytest.mark.parametrize("keep", [1, 2])
def test_retention_never_deletes_the_checkpoint_just_written(tmp_path, keep):
    make_checkpoints(tmp_path, [2, 6, 8])
    checkpoint.prune(tmp_path, keep, newest=tmp_path / CKPT(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ([CKPT(2)] if keep == 1 else [CKPT(2), CKPT(8)])


def test_overwrite_and_resume_auto_are_refused_together():
    from megatron_lax.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="choose one"):
        load_config(None, {"checkpoint.overwrite": "true", "checkpoint.resume": "auto"})


# --- one live run per directory (D1), the user's own files (D3), symbolic links (D6) ------------------------

def train_process(prepared, run_dir, **extra) -> subprocess.Popen:
    values = {**TINY, "train.steps": 10_000, "train.allow_repetition": "true", "optim.lr": 1e-2, "data.path": prepared,
              "logging.run_dir": run_dir, "logging.lax_stats_every": 0, "checkpoint.every": 2, **extra}
    return subprocess.Popen([sys.executable, "-m", "megatron_lax.train", "--config", "llama_tiny",
                             *[a for k, v in values.items() for a in (f"--{k}", str(v))]], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for(condition, process, seconds=240):
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None and time.time() < deadline, "the first run ended or never checkpointed"
        time.sleep(0.2)


def test_a_second_live_run_is_refused_and_a_killed_run_s_lock_is_taken_over(prepared_sample, tmp_path, capsys):
    first = train_process(prepared_sample, tmp_path)
    try:
        wait_for(lambda: (tmp_path / "checkpoints" / "latest").is_file(), first)
        code, _, err = train(prepared_sample, tmp_path, capsys, optim__lr=3e-3, checkpoint__resume="auto")
        assert code == 2 and err.strip().splitlines() == [
            f"error: logging.run_dir {tmp_path} is in use by a live run (PID {first.pid} on {socket.gethostname()}, "
            f"{tmp_path / checkpoint.LOCK}); wait for it to end, or choose another logging.run_dir"]
    finally:
        first.kill()  # kill -9: its lock file still names it
        first.wait()
    assert json.loads((tmp_path / checkpoint.LOCK).read_text())["pid"] == first.pid
    newest = int((tmp_path / "checkpoints" / "latest").read_text().split("_")[1])
    code, out, _ = train(prepared_sample, tmp_path, capsys, checkpoint__resume="auto", train__steps=newest + 1)
    assert code == 0, out
    assert f"note: taking over {tmp_path / checkpoint.LOCK} from PID {first.pid}, which is no longer running" in out
    assert f"at step {newest}" in out


def test_the_user_s_own_config_yaml_in_the_run_dir_is_never_overwritten(prepared_sample, tmp_path, capsys):
    """D3: --config DIR/config.yaml --logging.run_dir DIR starts (the file is not an earlier run) and
    neither the run nor its resume writes over the file."""
    mine = tmp_path / "config.yaml"
    mine.write_text("# my settings\npreset: llama_tiny\ntrain:\n  steps: 2\n")
    values = {**TINY, "data.path": prepared_sample, "logging.run_dir": tmp_path, "logging.lax_stats_every": 0}
    args = ["--config", str(mine), *[a for k, v in values.items() for a in (f"--{k}", str(v))]]
    assert main(args) == 0
    assert main([*args, "--checkpoint.resume", "auto", "--train.steps", "3"]) == 0
    out = capsys.readouterr().out
    assert f"note: keeping {mine}, which no run wrote" in out and "resumed from" in out
    assert mine.read_text() == "# my settings\npreset: llama_tiny\ntrain:\n  steps: 2\n"


def test_overwrite_removes_a_later_checkpoint_that_is_a_symbolic_link_not_its_target(prepared_sample, tmp_path,
                                                                                     capsys):
    """D6: the link is removed, what it points to is kept."""
    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    assert train(prepared_sample, run_dir, capsys, train__steps=4)[0] == 0
    root = run_dir / "checkpoints"
    shutil.move(root / CKPT(4), elsewhere)
    (root / CKPT(4)).symlink_to(elsewhere, target_is_directory=True)
    code, out, err = train(prepared_sample, run_dir, capsys, train__steps=3, checkpoint__resume=root / CKPT(2),
                           checkpoint__overwrite="true", checkpoint__every=0)
    assert code == 0, err
    assert sorted(p.name for p in root.iterdir()) == ["latest", CKPT(2), CKPT(3)]
    assert checkpoint.verify(elsewhere) is None


# --- a resume into a different model, or from files that cannot be read: one line -----------------------------

@pytest.fixture(scope="module")
def cola_run(prepared_sample, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cola") / "run"
    values = {**TINY, "train.steps": 2, "data.path": prepared_sample, "logging.run_dir": run_dir,
              "logging.lax_stats_every": 0, "model.method": "cola", "model.lax_gate": "identity"}
    assert main(["--config", "llama_tiny", *[a for k, v in values.items() for a in (f"--{k}", str(v))]]) == 0
    return run_dir


def reseal(directory: Path) -> None:
    manifest = json.loads((directory / checkpoint.MANIFEST).read_text())
    for name, meta in manifest["files"].items():
        meta.update(bytes=(directory / name).stat().st_size, sha256=checkpoint.sha256(directory / name))
    (directory / checkpoint.MANIFEST).write_text(json.dumps(manifest))


DAMAGE = {  # how the checkpoint is changed (manifest resealed), what the one line says
    "lax_latent": (None, "with a different model or data layout: model.lax_latent: 'output' -> 'projection'"),
    "only_latent_act": (None, "with a different model or data layout: model.only_latent_act: False -> True"),
    "weights_of_another_shape": ("model.pt", "the weights do not fit its config.yaml (size mismatch for embed.weight"),
    "empty_trainer_state": ("trainer_state.json", "trainer_state.json: cannot be read (not valid JSON: empty)"),
    "garbage_trainer_state": ("trainer_state.json", "trainer_state.json: cannot be read (not valid JSON)"),
    "empty_config": ("config.yaml", "config.yaml: empty; not the config a run wrote"),
    "garbage_config": ("config.yaml", "config.yaml: cannot be read (not UTF-8 text)"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_resume_into_another_model_or_from_unreadable_files_is_one_line(prepared_sample, cola_run, tmp_path,
                                                                          capsys, damage):
    import torch
    run_dir = tmp_path / "run"
    shutil.copytree(cola_run, run_dir, ignore=shutil.ignore_patterns(checkpoint.LOCK))
    ckpt = run_dir / "checkpoints" / CKPT(2)
    changed, message = DAMAGE[damage]
    extra = {"model.method": "cola", "model.lax_gate": "identity"}
    if changed is None:
        extra[f"model.{damage}"] = "projection" if damage == "lax_latent" else "true"
    elif changed == "model.pt":
        state = torch.load(ckpt / "model.pt", weights_only=True)
        state["embed.weight"] = torch.zeros(3, 3)
        torch.save(state, ckpt / "model.pt")
    else:
        (ckpt / changed).write_bytes(b"" if damage.startswith("empty") else b"\xff\xfe{garbage")
    reseal(ckpt)
    code, out, err = train(prepared_sample, run_dir, capsys, train__steps=3, checkpoint__resume="auto",
                           **{k.replace(".", "__"): v for k, v in extra.items()})
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: ") and message in lines[0] and (changed is None or str(ckpt) in lines[0])
