"""Checkpoints: one directory per save, written under a temporary name and renamed into place only
after every rank's files are written and their checksums recorded in a manifest; a `latest` file
points at the newest complete one.

    RUN_DIR/checkpoints/step_00001000/
        manifest.json         files and sha256 checksums, written last
        trainer_state.json    step, tokens seen, counters
        config.yaml           the resolved config
        rank_00000.pt ...     per-rank state: data loader position, RNG states
        model.pt, optimizer.pt, ... (whatever the engine writes)
    RUN_DIR/checkpoints/latest
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from . import config as config_lib
from . import faults
from .parallel.distributed import DistInfo, barrier, broadcast_object

MANIFEST = "manifest.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    pass


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(root: Path, step: int, engine, trainer_state: dict, rank_state: dict, cfg, dist: DistInfo,
         keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory. A failed write (disk
    full, no permission) raises CheckpointError and leaves the previous checkpoints as they were."""
    final = root / step_dir_name(step)
    staging = root / (step_dir_name(step) + ".incomplete")
    try:
        if dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        barrier()
        engine.save(staging)
        torch.save(rank_state, staging / f"rank_{dist.rank:05d}.pt")
        if dist.is_main:
            (staging / "config.yaml").write_text(config_lib.dump_yaml(cfg))
            _write_json_atomic(staging / "trainer_state.json", trainer_state)
        if step in faults.KILL_IN_CHECKPOINT:
            faults.kill_self()
        barrier()
        if dist.is_main:
            _publish(root, staging, final, step, cfg, dist, keep)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final}: {e.strerror or e}; the previous checkpoint "
                              f"is unchanged") from None
    barrier()
    return final


def _publish(root: Path, staging: Path, final: Path, step: int, cfg, dist: DistInfo, keep: int) -> None:
    """Checksums every file, writes the manifest, renames the directory into place, moves `latest`."""
    missing = [r for r in range(dist.world_size) if not (staging / f"rank_{r:05d}.pt").is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {final}: ranks {missing} did not write their state")
    files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
    manifest = {"step": step, "world_size": dist.world_size, "engine": cfg.parallel.engine,
                "files": {name: {"bytes": (staging / name).stat().st_size, "sha256": sha256(staging / name)}
                          for name in files}}
    _write_json_atomic(staging / MANIFEST, manifest)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    (root / (LATEST + ".tmp")).write_text(final.name)
    os.replace(root / (LATEST + ".tmp"), root / LATEST)
    prune(root, keep)


def verify(directory: Path) -> Optional[str]:
    """None if the checkpoint is complete and intact, else the reason in a few words."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (incomplete write)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "unreadable manifest"
    for name, meta in files.items():
        path = directory / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != meta["bytes"]:
            return f"truncated file {name}"
        if sha256(path) != meta["sha256"]:
            return f"checksum mismatch in {name}"
    return None


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories that look finished (renamed into place), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and not p.name.endswith(".incomplete"))


def prune(root: Path, keep: int) -> None:
    """Keeps the newest `keep` intact checkpoints; never removes the only intact one."""
    intact = [p for p in complete_checkpoints(root) if (p / MANIFEST).is_file()]
    for old in intact[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)


def find_resumable(root: Path, log=print) -> Optional[Path]:
    """The newest intact checkpoint under root; damaged ones are reported in one line and skipped."""
    for candidate in reversed(complete_checkpoints(root)):
        problem = verify(candidate)
        if problem is None:
            return candidate
        log(f"skipping checkpoint {candidate}: {problem}")
    return None


def resolve_resume(spec: str, run_dir: Path, dist: DistInfo, log=print) -> Optional[Path]:
    """`none`, `auto` (newest intact checkpoint of this run) or an explicit directory. Rank 0 decides."""
    if spec == "none":
        return None
    path = None
    if dist.is_main:
        if spec == "auto":
            path = find_resumable(run_dir / "checkpoints", log)
        else:
            path = Path(spec)
            problem = verify(path) if path.is_dir() else "not a directory"
            if problem:
                raise CheckpointError(f"cannot resume from {path}: {problem}")
    path = broadcast_object(str(path) if path else None)
    return Path(path) if path else None


# Fields that change the model's parameters or the meaning of the saved data position.
SHAPE_FIELDS = {"model": ("dim", "n_layers", "n_heads", "ffn_dim", "vocab_size", "method", "rank", "attn_rank",
                          "mlp_rank", "lax_gate", "lax_modules"),
                "data": ("seq_len", "mode", "seed"), "train": ("global_batch",)}


def check_compatible(directory: Path, cfg) -> None:
    """Refuses to resume with a config that changes the model shape or the data stream; steps,
    learning rate, logging and the like may change."""
    saved = config_lib.load_config(str(directory / "config.yaml"))
    differences = [f"{section}.{name}: {getattr(getattr(saved, section), name)!r} -> "
                   f"{getattr(getattr(cfg, section), name)!r}"
                   for section, names in SHAPE_FIELDS.items() for name in names
                   if getattr(getattr(saved, section), name) != getattr(getattr(cfg, section), name)]
    if differences:
        raise CheckpointError(f"cannot resume from {directory} with a different model or data layout: "
                              + "; ".join(differences))


def load(directory: Path, engine, dist: DistInfo) -> tuple[dict, dict]:
    """Restores the engine in place; returns (trainer_state, this rank's state)."""
    engine.load(directory)
    trainer_state = json.loads((directory / "trainer_state.json").read_text())
    rank_file = directory / f"rank_{dist.rank:05d}.pt"
    rank_state = torch.load(rank_file, weights_only=False) if rank_file.is_file() else {}
    return trainer_state, rank_state


def checkpoint_config(directory: Path) -> config_lib.Config:
    """The resolved config a checkpoint was written with (a run directory means its latest checkpoint)."""
    directory = resolve_checkpoint_dir(directory)
    return config_lib.load_config(str(directory / "config.yaml"))


def resolve_checkpoint_dir(path: Path) -> Path:
    """Accepts a checkpoint directory, a run's checkpoints/ directory or a run directory."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = find_resumable(root, log=lambda _: None)
        if found:
            return found
    raise CheckpointError(f"no intact checkpoint found at {path}")
