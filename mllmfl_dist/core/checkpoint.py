"""The files a run writes and reads back: written atomically, read with ``weights_only=True``.

Every output of the package goes through :func:`atomic_writer` (or a helper built on it: :func:`save_atomic`,
:func:`write_text_atomic`, :func:`savefig_atomic`), so a path holds either its old content or the complete
new one, never a torn file: the content goes to ``.<name>.<8 random chars>.tmp`` in the same directory, is
flushed and fsynced, renamed over the path, and the directory is fsynced so the rename survives a power
loss. A failed write removes its temporary file; a killed one leaves it behind, and each stage removes such
leftovers of its own outputs when it starts (:func:`remove_stale_temps`). A write that fails because the
disk is full (or the quota is used up, or the file system is read-only) raises :class:`OutputError`, one
line naming the path, instead of the library's traceback (``torch.save`` reports a full disk as
"unexpected pos"). Files are loaded with ``weights_only=True``, so a planted pickle cannot run code.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import numpy as np
import torch

from mllmfl_dist.core.errors import ConfigError, DataError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# errno values that mean "this output cannot be written here", with the words the message uses.
_OUTPUT_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EFBIG: "the file is too large for the file system or the process's file size limit",
}
TEMP_SUFFIX = ".tmp"
# What this module's temporary files are called (``.<name>.<mkstemp's 8 characters>.tmp``, ``.tmp.png`` from
# an earlier report writer, ``.<name>.tmp`` from an earlier write_text_atomic) and the shard writer's
# ``<name>.partial``; group "target" is the file the temporary one was to become.
_TEMP_NAME = re.compile(r"\.(?P<target>.+?)(\.[a-z0-9_]{8})?\.tmp(\.png)?|(?P<shard>.+)\.partial")


class OutputError(DataError):
    """An output could not be written (full disk, quota, read-only file system); the message is one line
    naming the path. A subclass of DataError, so the CLI prints it and exits non-zero like other errors a
    user can fix; nothing written before is touched."""


def as_output_error(err: BaseException, path: str | Path) -> BaseException:
    """``err`` as :class:`OutputError` naming ``path`` when it is an OSError of a full disk, a used-up quota
    or a read-only file system; else ``err`` itself (for ``raise as_output_error(err, path)``)."""
    translated = _output_error(err, Path(path)) if isinstance(err, OSError) else None
    return translated if translated is not None else err


def _output_error(err: OSError, path: Path) -> OutputError | None:
    code = err.errno or 0
    reason = _OUTPUT_ERRNOS.get(code)
    if reason is None:
        return None
    return OutputError(
        f"cannot write {path}: {reason} ({errno.errorcode.get(code, code)}); free space "
        f"under {path.parent} (or point run.root elsewhere) and rerun: finished work is kept"
    )


@contextlib.contextmanager
def output_errors(path: str | Path) -> Iterator[None]:
    """Turn an OSError of a full disk, a used-up quota or a read-only file system raised inside the block
    into :class:`OutputError` naming ``path``; other errors pass unchanged."""
    try:
        yield
    except OSError as err:
        translated = _output_error(err, Path(path))
        if translated is None:
            raise
        raise translated from None


class _RecordingWriter:
    """A binary file wrapper that remembers the OSError of a failed write: ``torch.save`` swallows it and
    raises ``RuntimeError: ... unexpected pos`` instead, which says nothing about the disk."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self._handle.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self._handle.flush()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform or file system opens directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """``with atomic_writer(path) as handle: handle.write(...)``: ``path`` is replaced by what was written
    only when the block ends without an error (temporary file, fsync, rename, directory fsync). On an error
    the temporary file is removed and ``path`` is left as it was; a full disk becomes :class:`OutputError`."""
    path = Path(path)
    with output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with output_errors(path):
            with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, _default_mode())  # mkstemp makes 0600 files; outputs get the usual mode
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` so that ``path`` is either the old file or the complete new one, never a torn one."""
    path = Path(path)
    with atomic_writer(path) as handle:
        recorder = _RecordingWriter(handle)
        try:
            torch.save(obj, recorder)  # type: ignore[arg-type]  # it writes through write/flush, not a whole IO
        except RuntimeError:
            if recorder.error is not None:
                raise recorder.error from None  # the disk's error, which atomic_writer reports in one line
            raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically; non-empty text ends with a newline."""
    with atomic_writer(path, "w") as handle:
        handle.write(text if not text or text.endswith("\n") else text + "\n")


def savefig_atomic(fig: Figure, path: str | Path, **kwargs: Any) -> None:
    """``fig.savefig`` (PNG unless ``format`` says otherwise) atomically."""
    kwargs.setdefault("format", "png")
    with atomic_writer(path) as handle:
        fig.savefig(handle, **kwargs)


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` to ``path`` (a JSONL log: a line torn by a kill is dropped by its reader); a full disk
    is an :class:`OutputError` naming the path."""
    with output_errors(path), open(path, "a") as handle:
        handle.write(text)


def stale_temp_target(name: str) -> str | None:
    """The output a temporary file called ``name`` was to become, when the name is one this package gives
    its temporary files (:func:`atomic_writer`, the shard writer's ``.partial``); else None."""
    match = _TEMP_NAME.fullmatch(name)
    if match is None:
        return None
    return match["target"] if match["target"] is not None else match["shard"]


def remove_stale_temps(*folders: str | Path, targets: Iterable[str] | None = None) -> list[Path]:
    """Remove, directly inside each of ``folders``, the temporary files of this package's naming left by a
    killed write (only files, only names :func:`stale_temp_target` recognises; with ``targets``, only those
    of these output names). Call it where no write of this job can be in flight. Returns what was removed."""
    wanted = None if targets is None else set(targets)
    removed = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            target = stale_temp_target(entry.name)
            if target is None or (wanted is not None and target not in wanted):
                continue
            if entry.is_file() and not entry.is_symlink():
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def file_identity(path: str | Path, *, digest: bool = False) -> dict[str, Any]:
    """What a "done" record says about a file it was made from or wrote, so a replaced, truncated or rewritten
    file no longer matches: its size and modification time (ns), or with ``digest`` its size and SHA-256
    (which a copy of the run directory keeps; for files small enough to hash on every rerun)."""
    path = Path(path)
    stat = path.stat()
    if not digest:
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return {"size": stat.st_size, "sha256": sha.hexdigest()}


def same_file(path: str | Path, identity: Any) -> bool:
    """Whether ``path`` exists and still matches ``identity`` from :func:`file_identity`."""
    if not isinstance(identity, dict) or "size" not in identity:
        return False
    try:
        return file_identity(path, digest="sha256" in identity) == identity
    except OSError:
        return False


def load(path: str | Path, safe_globals: Iterable[type] = ()) -> Any:
    """``torch.load(weights_only=True)`` on the CPU; ``safe_globals``: the few library classes (besides
    tensors and plain containers) a file may hold."""
    allowed: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = list(safe_globals)
    context = torch.serialization.safe_globals(allowed) if allowed else contextlib.nullcontext()
    with context:
        return torch.load(path, map_location="cpu", weights_only=True)


def unreadable_reason(path: str | Path, err: BaseException) -> str:
    """Why :func:`load` failed on ``path``, in words: empty, not a PyTorch file, unsafe, truncated."""
    path = Path(path)
    detail = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}" if str(err).strip() else type(err).__name__
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as os_err:
        return f"cannot be opened ({os_err.strerror or os_err})"
    if size == 0:
        return "is empty (0 bytes: a write cut off by a crash or a full disk)"
    if "weights only load failed" in str(err).lower() or "weights_only" in str(err):
        return (
            "holds objects other than tensors and plain containers, which only a full unpickler would build "
            "(and that can run code from the file), so it was not loaded"
        )
    if head[:2] != b"PK" and head[:1] != b"\x80":  # a zip archive (torch.save) or a legacy pickle
        return "is not a PyTorch checkpoint file"
    return f"is truncated or corrupt ({detail})"


def load_or_explain(path: str | Path, what: str, safe_globals: Iterable[type] = ()) -> Any:
    """:func:`load`, turning an unreadable file (not a torch file, empty, truncated, unsafe pickle) into a
    ConfigError that names ``what`` and the path, instead of a traceback."""
    try:
        return load(path, safe_globals)
    except Exception as err:  # noqa: BLE001 - pickle, zip and weights_only errors have no common base
        raise ConfigError(f"{what}: {path} {unreadable_reason(path, err)}; replace it or move it away") from None


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states in types that ``weights_only`` loading accepts."""
    # the global RandomState's MT19937 tuple (legacy=True is the default; numpy's stub types a call without it
    # as the dict form)
    np_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state(
        ("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
