"""What may be unpickled. Unpickling runs whatever code the file asks for, so nothing a user is handed
is unpickled unless they say they trust it, and trust never follows from where a file sits.

Everything this codebase writes loads without unpickling arbitrary objects: tensors and plain data
(numbers, strings, lists, dicts) through torch.load(weights_only=True), JSON, YAML (safe_load) and
safetensors; FSDP2's DCP checkpoints through a reader that accepts only DCP's own metadata classes
and never falls back to pickle. Model, optimizer and rank files are never unpickled without the flag.
DeepSpeed's checkpoint files (DeepSpeed objects) need full unpickling: they are read when the user
passes --trust-checkpoint (train and finetune: --checkpoint.trust true), or when a run resumes a
checkpoint it can prove it wrote itself: the manifest's signature (an HMAC with a key kept outside
every run directory, keyed to the checkpoint's resolved path) matches, so a copied or moved folder,
or one handed over, fails the proof. Anything else is refused with one line that names the flag.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import os
import pickle
import secrets
from contextvars import ContextVar
from pathlib import Path

import torch

TRUST_FLAG = "--trust-checkpoint (train and finetune: --checkpoint.trust true)"
EVERYTHING = "*"

_trusted: ContextVar[tuple] = ContextVar("megatron_lax_trusted", default=())


class UntrustedFile(ValueError):
    """A file that would have to be unpickled, outside every trusted place."""


@contextlib.contextmanager
def trusting(*roots, everything: bool = False):
    """Within the block, DeepSpeed files under `roots` (checkpoints proven to be the run's own, see
    proven) or, with everything (the user's flag), every file may be unpickled."""
    added = tuple(Path(root).resolve() for root in roots) + ((EVERYTHING,) if everything else ())
    token = _trusted.set(_trusted.get() + added)
    try:
        yield
    finally:
        _trusted.reset(token)


def flagged() -> bool:
    """The user said they trust what they handed over (--trust-checkpoint / checkpoint.trust)."""
    return EVERYTHING in _trusted.get()


def is_trusted(path) -> bool:
    if flagged():
        return True
    path = Path(path).resolve()
    return any(path.is_relative_to(root) for root in _trusted.get() if root != EVERYTHING)


# --- the proof that a checkpoint is this user's run's own ---------------------------------------------------

SIGNATURE = "manifest.sig"


def key_dir() -> Path:
    """Where the signing key lives: outside every run directory ($XDG_STATE_HOME or ~/.local/state)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "megatron_lax" / "keys"


def _key(create: bool) -> bytes | None:
    path = key_dir() / "checkpoint.key"
    if not path.is_file():
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f"checkpoint.key.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # fails if another process made one meanwhile: keep the first
        except FileExistsError:
            pass
        tmp.unlink(missing_ok=True)
    return path.read_bytes()


def _signature(key: bytes, manifest: bytes, checkpoint_dir: Path) -> str:
    message = str(Path(checkpoint_dir).resolve()).encode() + b"\0" + manifest
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign(manifest: bytes, final_dir: Path) -> str:
    """The signature of a manifest for the checkpoint that will live at final_dir."""
    return _signature(_key(create=True), manifest, final_dir)


def proven(checkpoint_dir: Path) -> bool:
    """Whether this user's runs wrote the checkpoint at this very path (its files' checksums are the
    manifest's: checkpoint.verify checks them before anything is loaded)."""
    checkpoint_dir = Path(checkpoint_dir)
    try:
        key = _key(create=False)
        manifest = (checkpoint_dir / "manifest.json").read_bytes()
        signature = (checkpoint_dir / SIGNATURE).read_text().strip()
    except OSError:
        return False
    return key is not None and hmac.compare_digest(_signature(key, manifest, checkpoint_dir), signature)


def refusal(path, what: str) -> UntrustedFile:
    return UntrustedFile(f"{path} {what}, which can run code when loaded; it is read only if you trust its "
                         f"source: pass {TRUST_FLAG}")


def require(path, what: str) -> None:
    """Refuses, in one line, to open `path` (a format that is always unpickled) unless it is trusted."""
    if not is_trusted(path):
        raise refusal(path, what)


def load_tensors(path, map_location="cpu", mmap: bool = False):
    """torch.load of tensors and plain data. A file holding other objects is unpickled only with the
    user's flag (never because of where it sits); a file that is not a torch file at all is a
    one-line ValueError, never described as pickled."""
    why_not = not_a_torch_file(path)
    if why_not:
        raise ValueError(f"{path}: not a readable PyTorch file ({why_not})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # not a pickle of other objects: a damaged or foreign file
            raise ValueError(f"{path}: not a readable PyTorch file (damaged, or not written by torch.save)") from None
        if not flagged():
            raise refusal(path, "holds pickled Python objects besides tensors") from None
    except EOFError:
        raise ValueError(f"{path}: not a readable PyTorch file (empty or cut short)") from None
    except Exception as e:  # noqa: BLE001 - the weights-only unpickler runs no code; damaged bytes fail in many ways
        raise ValueError(f"{path}: not a readable PyTorch file ({_first_line(e)})") from None
    try:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - a trusted file that still does not load
        raise ValueError(f"{path}: cannot be loaded ({type(e).__name__}: {_first_line(e)})") from None


def not_a_torch_file(path) -> str | None:
    """Why the file cannot be one torch.save wrote, judged by its first bytes (a zip archive, or the
    legacy format's pickle protocol header); None when it may be."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    if not head:
        return "empty or cut short"
    if head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return None
    return "neither a zip archive nor a pickle: damaged, or not written by torch.save"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# --- plain pickles with a fixed set of classes (DCP's metadata) -----------------------------------------------

class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only the globals in `allowed` ({module: names}): building an allowed class or looking
    up a dtype runs no code of the file's choosing."""

    def __init__(self, file, allowed: dict[str, set[str]]):
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str):
        if name in self.allowed.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not an allowed class")


def restricted_load(path, allowed: dict[str, set[str]], what: str):
    """A plain pickle file holding only the allowed classes; anything else is refused in one line,
    flag or not: what this codebase writes never needs more."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        return RestrictedUnpickler(io.BytesIO(data), allowed).load()
    except pickle.UnpicklingError as e:
        if "is not an allowed class" in str(e):
            raise UntrustedFile(f"{path} holds {what} that is not plain data ({e}), which can run code when "
                                f"loaded; this code never writes such a file, so it is not loaded") from None
        raise ValueError(f"{path}: not readable {what} ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - only allowed classes are built; damaged bytes fail in many ways
        raise ValueError(f"{path}: not readable {what} ({type(e).__name__}: {_first_line(e)})") from None
