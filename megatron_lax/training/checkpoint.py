"""Checkpoints: one directory per save, written under a temporary name and renamed into place only
after every rank has written its files and checksummed its share of them; rank 0 writes the manifest
last, and a `latest` file points at the newest complete checkpoint.

    RUN_DIR/checkpoints/step_00001000/
        manifest.json         files and sha256 checksums, written last
        trainer_state.json    step, tokens seen, counters
        config.yaml           the resolved config
        rank_00000.pt ...     per-rank state: data loader position, RNG states
        model.pt, optimizer.pt, ... (whatever the engine writes)
    RUN_DIR/checkpoints/latest

Every stage of a save that can fail on one rank (a full disk, a permission) ends with the ranks
agreeing on the outcome, so that a failure anywhere raises the same error on every rank.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Optional

import torch
from torch.distributed.checkpoint.api import CheckpointException

from .. import config as config_lib
from ..parallel import trust
from ..parallel.distributed import DistInfo, all_gather_object, broadcast_object

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


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


# --- agreement between ranks ------------------------------------------------------------------------

LOCAL = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
WRITE_ERRORS = (OSError, CheckpointError, CheckpointException)


def _reason(error: BaseException, dist: DistInfo) -> str:
    rank = dist.rank
    if isinstance(error, CheckpointException):  # DCP raises it on every rank, naming the ranks that failed
        rank, (error, _) = min(error.failures.items())
    reason = str(error)
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror + (f": {error.filename}" if error.filename else "")
    return f"rank {rank}: {reason}" if dist.world_size > 1 else reason


def _collectively(dist: DistInfo, action) -> list:
    """Runs action() on every rank and returns every rank's result (rank order) on every rank. If it
    failed anywhere, every rank raises the same CheckpointError, naming the lowest failing rank: all
    ranks stop at the same point, so none waits in a collective that a failed rank never reaches."""
    result, reason = None, None
    try:
        result = action()
    except WRITE_ERRORS as e:
        reason = _reason(e, dist)
    outcomes = all_gather_object((reason, result)) if dist.world_size > 1 else [(reason, result)]
    reasons = [r for r, _ in outcomes if r]
    if reasons:
        raise CheckpointError(reasons[0])
    return [r for _, r in outcomes]


def _from_main(dist: DistInfo, action):
    """action() run on rank 0 only; its result (or its failure, raised) on every rank."""
    if dist.world_size == 1:
        return action()
    outcome = (None, None)
    if dist.is_main:
        try:
            outcome = (None, action())
        except WRITE_ERRORS as e:
            outcome = (_reason(e, dist), None)
    reason, result = broadcast_object(outcome)
    if reason:
        raise CheckpointError(reason)
    return result


# --- checksums, each rank its share -------------------------------------------------------------------

def shares(sizes: dict[str, int], world_size: int) -> list[list[str]]:
    """The files split into world_size lists of about equal bytes: largest first, each to the rank
    with the fewest bytes so far. Every rank computes the same split from the same sizes."""
    loads, lists = [0] * world_size, [[] for _ in range(world_size)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = loads.index(min(loads))
        lists[rank].append(name)
        loads[rank] += sizes[name]
    return lists


def _my_share(sizes: dict[str, int], dist: DistInfo) -> list[str]:
    return sorted(shares(sizes, dist.world_size)[dist.rank])


def _hash_share(directory: Path, sizes: dict[str, int], dist: DistInfo) -> dict:
    return {name: {"bytes": sizes[name], "sha256": sha256(directory / name)} for name in _my_share(sizes, dist)}


def _file_sizes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


# --- save -------------------------------------------------------------------------------------------------

def save(root: Path, step: int, engine, trainer_state: dict, rank_state: dict, cfg, dist: DistInfo,
         keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory. A write that fails on
    any rank (disk full, no permission) raises the same CheckpointError on every rank, removes the
    staging directory and leaves the previous checkpoints as they were."""
    final = root / step_dir_name(step)
    staging = root / (step_dir_name(step) + ".incomplete")
    try:
        _collectively(dist, lambda: _make_staging(staging) if dist.is_main else None)
        _collectively(dist, lambda: _write_state(staging, engine, trainer_state, rank_state, cfg, dist))
        sizes = _from_main(dist, lambda: _file_sizes(staging))
        digests = _collectively(dist, lambda: _hash_share(staging, sizes, dist))
        files = {name: meta for share in digests for name, meta in share.items()}
        _collectively(dist, lambda: _publish(root, staging, final, step, files, cfg, dist, keep) if dist.is_main
                      else None)
    except CheckpointError as e:
        if dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final}: {e}; the previous checkpoint is unchanged") \
            from None
    return final


def _make_staging(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)


def _write_state(staging: Path, engine, trainer_state: dict, rank_state: dict, cfg, dist: DistInfo) -> None:
    try:
        engine.save(staging)
        torch.save(rank_state, staging / rank_file(dist.rank))
    except RuntimeError as e:  # torch.save's writer reports a full disk as "[enforce fail at ...] . unexpected pos"
        reason = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", str(e).strip().splitlines()[0])
        raise CheckpointError(f"writing into {staging.name} failed ({reason}: a full disk or an I/O error)") from None
    if dist.is_main:
        (staging / "config.yaml").write_text(config_lib.dump_yaml(cfg))
        _write_json_atomic(staging / "trainer_state.json", trainer_state)


def _publish(root: Path, staging: Path, final: Path, step: int, files: dict, cfg, dist: DistInfo,
             keep: int) -> None:
    """Writes the manifest (last), renames the directory into place, moves `latest`, prunes."""
    missing = [r for r in range(dist.world_size) if rank_file(r) not in files]
    if missing:
        raise CheckpointError(f"ranks {missing} did not write their state")
    manifest = {"step": step, "world_size": dist.world_size, "engine": cfg.parallel.engine,
                "files": dict(sorted(files.items()))}
    _write_json_atomic(staging / MANIFEST, manifest)
    _sign(staging, final)
    _remove(final)
    os.replace(staging, final)
    _point_latest(root, final.name)
    prune(root, keep, final)


def _sign(staging: Path, final: Path) -> None:
    """The proof that this run wrote the checkpoint at `final` (parallel.trust.proven); without a
    writable key directory the checkpoint is unsigned (resuming DeepSpeed state then needs the flag)."""
    try:
        (staging / trust.SIGNATURE).write_text(trust.sign((staging / MANIFEST).read_bytes(), final))
    except OSError as e:
        print(f"note: checkpoint {final} is not signed ({e.strerror}: {e.filename})")


def _remove(path: Path) -> None:
    """Removes a checkpoint directory, or a symbolic link in its place (not what it points to)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _point_latest(root: Path, name: str) -> None:
    (root / (LATEST + ".tmp")).write_text(name)
    os.replace(root / (LATEST + ".tmp"), root / LATEST)


# --- the run directory ------------------------------------------------------------------------------------

# What a run leaves in its run directory: an earlier run is recognised by these, and
# checkpoint.overwrite deletes exactly these (and nothing else a user may keep there).
EARLIER_RUN = ("checkpoints", "best", "metrics.jsonl", "finished.json", "config.yaml")
RUN_OUTPUTS = EARLIER_RUN + ("tensorboard", "deepspeed_config.json")


# The first line of the config.yaml a run writes into its run directory: a config.yaml without it is
# the user's own, which no run counts as an earlier run's, overwrites or deletes.
RUN_CONFIG_HEADER = "# the resolved config of the run in this directory (written by megatron_lax; rewritten on resume)\n"


def written_by_a_run(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(RUN_CONFIG_HEADER)) == RUN_CONFIG_HEADER.encode()
    except OSError:
        return False


def write_run_config(run_dir: Path, cfg, log=print) -> None:
    """The resolved config as run_dir/config.yaml, unless a config.yaml there is the user's own."""
    path = run_dir / "config.yaml"
    if path.exists() and not written_by_a_run(path):
        log(f"note: keeping {path}, which no run wrote; the resolved config is in each checkpoint's config.yaml")
        return
    path.write_text(RUN_CONFIG_HEADER + config_lib.dump_yaml(cfg))


def earlier_run(run_dir: Path) -> list[str]:
    """What an earlier run left in run_dir, in a few words each ([] when nothing)."""
    found = []
    for name in EARLIER_RUN:
        path = run_dir / name
        if path.is_dir() and name in ("checkpoints", "best"):
            steps = [p.name for p in complete_checkpoints(path)]
            if steps:
                found.append(f"{name}/ up to {steps[-1]}")
        elif path.is_file() and path.stat().st_size > 0:  # an empty metrics.jsonl: a start that failed at once
            if name != "config.yaml" or written_by_a_run(path):
                found.append(name)
    return found


LOCK = "run.lock"
_held: dict[Path, int] = {}  # the run directories this process holds: resolved path -> the lock's descriptor


def _holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def lock_run_dir(run_dir: Path, log=print) -> None:
    """Makes this process the one live run of run_dir: an exclusive lock on run_dir/run.lock, which
    names the holder's host and PID. Another live holder is refused in one line; the lock of a run
    that died (kill -9: the kernel released it, and on this host its PID is gone) is taken over."""
    key = Path(run_dir).resolve()
    if key in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    holder, host = _holder(fd), socket.gethostname()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder = _holder(fd)
        held_elsewhere = holder.get("host") == host and holder.get("pid") != os.getpid() and _alive(holder.get("pid"))
    except BlockingIOError:
        held_elsewhere = True
    if held_elsewhere:  # (a live PID without the lock: a file system where locks are not shared)
        os.close(fd)
        raise CheckpointError(f"logging.run_dir {run_dir} is in use by a live run (PID {holder.get('pid', '?')} on "
                              f"{holder.get('host', '?')}, {run_dir / LOCK}); wait for it to end, or choose another "
                              f"logging.run_dir")
    if holder.get("pid") and holder.get("host") == host:
        log(f"note: taking over {run_dir / LOCK} from PID {holder['pid']}, which is no longer running")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": host, "pid": os.getpid()}).encode(), 0)
    _held[key] = fd


def release_run_dir(run_dir: Path) -> None:
    """Ends this process's hold on run_dir (the lock file stays, naming no live run)."""
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def claim_run_dir(run_dir: Path, cfg, dist: Optional[DistInfo] = None) -> None:
    """Before a run writes anything: a run never replaces or deletes another run's checkpoints, nor
    appends to its metrics. In a run_dir that holds an earlier run, `checkpoint.resume auto`
    continues it; a fresh start, or a resume from a checkpoint elsewhere, stops with one line unless
    `checkpoint.overwrite` (which deletes the earlier run's outputs first). Resuming a checkpoint of
    the run_dir with later intact checkpoints beside it stops the same way (overwrite deletes the
    later ones). Rank 0 first takes the directory's lock (lock_run_dir). Collective: rank 0 decides
    and acts, every rank raises the same CheckpointError."""
    def claim():
        lock_run_dir(Path(run_dir))
        _claim(Path(run_dir), cfg.checkpoint)
    _from_main(dist or LOCAL, claim)


def _claim(run_dir: Path, c) -> None:
    found = earlier_run(run_dir)
    if not found or c.resume == "auto":
        return
    if c.resume != "none" and Path(c.resume).resolve().is_relative_to(run_dir.resolve()):
        return _rewind(run_dir, Path(c.resume), c.overwrite)
    if not c.overwrite:
        raise CheckpointError(f"logging.run_dir {run_dir} holds an earlier run ({', '.join(found)}); continue it "
                              f"with --checkpoint.resume auto, start over with --checkpoint.overwrite true (deletes "
                              f"its checkpoints and logs), or choose another logging.run_dir")
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if name == "config.yaml" and path.is_file() and not written_by_a_run(path):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _rewind(run_dir: Path, resumed: Path, overwrite: bool) -> None:
    """Resuming a checkpoint of this run directory: the intact checkpoints after it would be replaced."""
    root = run_dir / "checkpoints"
    later = [p for p in complete_checkpoints(root) if (p / MANIFEST).is_file() and p.name > resumed.name]
    if not later or not resumed.name.startswith("step_"):  # not a checkpoint: resolve_resume says why
        return
    if not overwrite:
        raise CheckpointError(f"resuming {resumed} would replace the later checkpoints "
                              f"{', '.join(p.name for p in later)} of {run_dir}; continue from the newest with "
                              f"--checkpoint.resume auto, or delete the later ones with --checkpoint.overwrite true")
    for path in later:
        _remove(path)
    newest = [p for p in complete_checkpoints(root) if (p / MANIFEST).is_file()]
    if newest:
        _point_latest(root, newest[-1].name)
    else:
        (root / LATEST).unlink(missing_ok=True)


# --- verify, find, resume ---------------------------------------------------------------------------------

def _manifest_files(directory: Path):
    """The manifest's {name: {bytes, sha256}}, or the reason it cannot be used."""
    if not directory.is_dir():
        return "not a directory"
    if not (directory / MANIFEST).is_file():
        return "no manifest (incomplete write)"
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
        if all(isinstance(m["bytes"], int) and isinstance(m["sha256"], str) for m in files.values()):
            return files
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        pass
    return "unreadable manifest"


def _check_files(directory: Path, files: dict) -> Optional[str]:
    inside = directory.resolve()
    for name, meta in files.items():
        path = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not path.resolve().is_relative_to(inside):
            return f"the manifest names a file outside the checkpoint ({name!r})"  # never opened, nor its existence told
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != meta["bytes"]:
            return f"truncated file {name}"
        try:
            if sha256(path) != meta["sha256"]:
                return f"checksum mismatch in {name}"
        except OSError as e:
            return f"unreadable file {name} ({e.strerror})"
    return None


def verify(directory: Path, dist: Optional[DistInfo] = None) -> Optional[str]:
    """None if the checkpoint is complete and intact, else the reason in a few words. With a
    multi-rank `dist` it is a collective: each rank checksums its share of the files."""
    dist = dist or LOCAL
    files = _from_main(dist, lambda: _manifest_files(Path(directory)))
    if isinstance(files, str):
        return files
    mine = _my_share({name: meta["bytes"] for name, meta in files.items()}, dist)
    problem = _check_files(Path(directory), {name: files[name] for name in mine})
    problems = [p for p in (all_gather_object(problem) if dist.world_size > 1 else [problem]) if p]
    return problems[0] if problems else None


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories that look finished (renamed into place), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and not p.name.endswith(".incomplete"))


def prune(root: Path, keep: int, newest: Optional[Path] = None) -> None:
    """Keeps the newest `keep` intact checkpoints (by step; `newest`, the one just written, counts as
    the newest whatever its step); never removes the only intact one, nor `newest`."""
    intact = sorted((p for p in complete_checkpoints(root) if (p / MANIFEST).is_file()),
                    key=lambda p: (p == newest, p.name))
    for old in intact[:-max(1, keep)]:
        try:
            _remove(old)
        except OSError as e:
            print(f"note: could not remove the old checkpoint {old} ({e.strerror})")


def find_resumable(root: Path, log=print, dist: Optional[DistInfo] = None) -> Optional[Path]:
    """The newest intact checkpoint under root; damaged ones are reported in one line and skipped.
    With a multi-rank `dist`, a collective (see verify)."""
    dist = dist or LOCAL
    candidates = _from_main(dist, lambda: [str(p) for p in reversed(complete_checkpoints(root))])
    for candidate in map(Path, candidates):
        problem = verify(candidate, dist)
        if problem is None:
            return candidate
        log(f"skipping checkpoint {candidate}: {problem}")
    return None


def resolve_resume(spec: str, run_dir: Path, dist: DistInfo, log=print) -> Optional[Path]:
    """`none`, `auto` (newest intact checkpoint of this run) or an explicit directory. Collective."""
    if spec == "none":
        return None
    if spec == "auto":
        return find_resumable(run_dir / "checkpoints", log, dist)
    problem = verify(Path(spec), dist)
    if problem:
        raise CheckpointError(f"cannot resume from {spec}: {problem}")
    return Path(spec)


def check_compatible(directory: Path, cfg) -> None:
    """Refuses to resume with a config that changes the model (its shapes or the function it computes)
    or the data stream, or with an engine that cannot read the checkpoint's files; what may change is
    what config.RESUME_FIXED leaves out: steps, learning rate, logging, the number of ranks, ..."""
    saved = read_config(directory / "config.yaml")
    differences = [f"{section}.{name}: {getattr(getattr(saved, section), name)!r} -> "
                   f"{getattr(getattr(cfg, section), name)!r}"
                   for section, names in config_lib.resume_fixed_fields().items() for name in names
                   if getattr(getattr(saved, section), name) != getattr(getattr(cfg, section), name)]
    if differences:
        raise CheckpointError(f"cannot resume from {directory} with a different model or data layout: "
                              + "; ".join(differences))
    if _state_format(saved.parallel.engine) != _state_format(cfg.parallel.engine):
        raise CheckpointError(f"cannot resume from {directory}: it holds parallel.engine {saved.parallel.engine} "
                              f"state, which parallel.engine {cfg.parallel.engine} cannot read (load it with "
                              f"{saved.parallel.engine} on any number of ranks)")


def _state_format(engine: str) -> str:
    return "model.pt" if engine in ("single", "ddp") else engine


def load(directory: Path, engine, dist: DistInfo) -> tuple[dict, dict, Optional[dict]]:
    """Restores the engine in place (resharded if the checkpoint was written by another number of
    ranks); returns (trainer state, data loader state, this rank's RNG state or None).

    A checkpoint is written at a step boundary, where the loader state is the same on every rank
    (the data of a step does not depend on the number of ranks), so every rank restores rank 0's.
    RNG states are per rank; a rank that did not exist when the checkpoint was written gets None.
    Rank files hold plain data; one written before RNG states were (numpy objects) is unpickled
    only from a trusted place (megatron_lax.trust: the run's own directory, or --checkpoint.trust)."""
    try:
        engine.load(directory)
    except RuntimeError as e:  # load_state_dict: weights of another shape than the config's model
        raise CheckpointError(f"{directory}: the weights do not fit its config.yaml "
                              f"({str(e).strip().splitlines()[-1].strip()})") from None
    trainer_state = read_json(directory / "trainer_state.json")
    loader_state = trust.load_tensors(directory / rank_file(0))["loader"]
    own = directory / rank_file(dist.rank)
    rng_state = trust.load_tensors(own)["rng"] if own.is_file() else None
    return trainer_state, loader_state, rng_state


def checkpoint_config(directory: Path) -> config_lib.Config:
    """The resolved config a checkpoint was written with (a run directory means its latest checkpoint)."""
    directory = resolve_checkpoint_dir(directory)
    return read_config(directory / "config.yaml")


def read_json(path: Path):
    """A JSON file a checkpoint holds; an unreadable one is a one-line CheckpointError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not valid JSON" + ("" if Path(path).stat().st_size else
                                                                                ": empty")
        raise CheckpointError(f"{path}: cannot be read ({reason})") from None


def read_config(path: Path) -> config_lib.Config:
    """A checkpoint's config.yaml; an empty or unreadable one is a one-line error naming it."""
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        raise CheckpointError(f"{path}: empty; not the config a run wrote")
    return config_lib.load_config(str(path))


def intact_checkpoint_dir(path: Path) -> Path:
    """As resolve_checkpoint_dir, and a checkpoint directory named directly is verified too (a run
    directory's newest intact one already is): what loaders use before reading weights."""
    found = resolve_checkpoint_dir(path)
    if found == Path(path):
        problem = verify(found)
        if problem:
            raise CheckpointError(f"checkpoint {found} is damaged: {problem}")
    return found


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
