"""What may be unpickled. Unpickling runs whatever code the file asks for, so nothing a user is handed
is unpickled unless they say they trust it.

Everything this codebase writes loads without unpickling arbitrary objects: tensors and plain data
(numbers, strings, lists, dicts) through torch.load(weights_only=True), JSON, YAML (safe_load) and
safetensors; FSDP2's DCP checkpoints through a reader that accepts only DCP's own metadata classes.
Two kinds of file need full unpickling: DeepSpeed's checkpoint files (they hold DeepSpeed objects),
and our rank files written before RNG states were stored as plain data. They are read only from a
trusted place: the run's own directory when a run resumes, or anywhere when the user passes
--trust-checkpoint (train and finetune: --checkpoint.trust true). Anything else is refused with one
line that names that flag.
"""
from __future__ import annotations

import contextlib
import io
import pickle
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
    """Within the block, files under `roots` (or, with everything, all files) may be unpickled."""
    added = tuple(str(Path(root).resolve()) for root in roots) + ((EVERYTHING,) if everything else ())
    token = _trusted.set(_trusted.get() + added)
    try:
        yield
    finally:
        _trusted.reset(token)


def is_trusted(path) -> bool:
    trusted = _trusted.get()
    if EVERYTHING in trusted:
        return True
    path = Path(path).resolve()
    return any(path.is_relative_to(root) for root in trusted)


def refusal(path, what: str) -> UntrustedFile:
    return UntrustedFile(f"{path} {what}, which can run code when loaded; it is read only if you trust its "
                         f"source: pass {TRUST_FLAG}")


def require(path, what: str) -> None:
    """Refuses, in one line, to open `path` (a format that is always unpickled) unless it is trusted."""
    if not is_trusted(path):
        raise refusal(path, what)


def load_tensors(path, map_location="cpu", mmap: bool = False):
    """torch.load of tensors and plain data. A file holding other objects is unpickled only when
    trusted; a file that is not a torch file at all is a one-line ValueError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        if not is_trusted(path):
            raise refusal(path, "holds pickled Python objects besides tensors") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: not a readable PyTorch file ({_first_line(e)})") from None
    try:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - a trusted file that still does not load
        raise ValueError(f"{path}: cannot be loaded ({type(e).__name__}: {_first_line(e)})") from None


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
    """A plain pickle file holding only the allowed classes; anything else is refused in one line
    (or, when trusted, unpickled as it is)."""
    data = Path(path).read_bytes()
    try:
        return RestrictedUnpickler(io.BytesIO(data), allowed).load()
    except pickle.UnpicklingError as e:
        if not is_trusted(path):
            raise refusal(path, f"holds {what} that is not plain data ({e})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{path}: not readable {what} ({type(e).__name__}: {_first_line(e)})") from None
    return pickle.loads(data)
