"""One job per run directory: an exclusive ``flock`` on ``<run dir>/run.lock`` for as long as a command writes
there, and on ``<run dir>/report/report.lock`` while a report is written.

Without it two jobs given the same ``run.name`` (an sbatch submitted twice, a requeued job starting while the
old step still runs, a ``compare`` and a ``federate`` sharing a name) both exit 0 with their records
interleaved and their final files from whichever finished last. A ``flock`` is released by the kernel when
the holder's process ends, however it ends (SIGKILL, OOM killer), so a killed job never blocks its rerun;
the lock file only carries the holder's name (host, pid, command, launch, start) for the refusal's message.

Rank 0 takes the lock for the whole job and every rank hears the outcome (:func:`holding`): the ranks of one
launch, on any node, share it, and a refused launch ends on every rank with the same one-line error (exit 2)
before anything is written. A process that holds a directory may enter it again (``run``'s stages,
``compare``'s rows); what it holds lives on the :class:`~mllmfl_dist.core.dist.Runtime`
(:class:`~mllmfl_dist.core.dist.HeldLocks`), since a second ``flock`` on a new descriptor of the same file
would refuse its own process.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from mllmfl_dist.core import dist
from mllmfl_dist.core.dist import HeldLocks, Runtime
from mllmfl_dist.core.errors import ConfigError


log = logging.getLogger(__name__)

RUN_LOCK = "run.lock"  # in the run directory
REPORT_LOCK = "report.lock"  # in its report/ folder


class RunDirBusyError(ConfigError):
    """Another process holds the lock of the directory this command would write. One line naming the holder
    (host, pid, command, launch, since when); exit code 2, nothing written."""


def launch_text(env: Mapping[str, str] | None = None) -> str:
    """The launcher's name for this job: ``torchrun run <id>``, ``slurm job <J> step <S>`` or ``slurm job <J>``;
    empty for a plain process."""
    env = os.environ if env is None else env
    parts = []
    if env.get("TORCHELASTIC_RUN_ID"):
        parts.append(f"torchrun run {env['TORCHELASTIC_RUN_ID']}")
    if env.get("SLURM_JOB_ID"):
        step = env.get("SLURM_STEP_ID")
        parts.append(f"slurm job {env['SLURM_JOB_ID']}" + (f" step {step}" if step else ""))
    return ", ".join(parts)


def acquire(
    lock_file: Path, command: str, *, wait: bool = False, advice: str = "choose another run.name"
) -> TextIO | None:
    """Take the exclusive ``flock`` on ``lock_file`` (created, with its folder) and write this process's name
    into it; returns the open file, whose closing (or this process's end) releases the lock.

    Raises :class:`RunDirBusyError` naming the holder (and ``advice``) when another process holds it (``wait``:
    block until it is free instead). Returns None, after a warning, where the file cannot be made or the file
    system has no locks (the run then goes on unprotected, as before this lock existed)."""
    import fcntl

    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_file, "a+")
    except OSError as err:
        log.warning(
            "cannot create the lock file %s (%s); another job writing there would not be stopped", lock_file, err
        )
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(handle)
        handle.close()
        raise RunDirBusyError(
            f"{lock_file.parent} is in use by {holder}; nothing was written. Wait for it to end "
            f"(a killed holder frees it at once), or {advice}"
        ) from None
    except OSError as err:
        handle.close()
        log.warning(
            "cannot lock %s (%s: this file system has no flock); another job writing there would not be stopped",
            lock_file,
            err,
        )
        return None
    record = {
        "command": command,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "launch": launch_text(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        handle.truncate(0)
        handle.write(json.dumps(record) + "\n")
        handle.flush()
    except OSError as err:  # the name is for the message only; the lock holds without it
        log.warning("cannot write the holder into %s (%s)", lock_file, err)
    return handle


def _holder(handle: TextIO) -> str:
    """The holder's name from its lock file. It writes the name right after taking the lock, so an empty file
    is re-read for a moment (a holder caught between the two)."""
    for _ in range(50):
        handle.seek(0)
        text = handle.read().strip()
        if text:
            break
        time.sleep(0.02)
    try:
        rec = json.loads(text)
        launch = f", {rec['launch']}" if rec.get("launch") else ""
        return f"`{rec['command']}` (pid {rec['pid']} on host {rec['host']}{launch}, since {rec['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process (its lock file names no holder yet)"


@contextmanager
def holding(runtime: Runtime, run_dir: str | Path, command: str | None = None) -> Iterator[None]:
    """Hold ``run_dir`` for this job for the ``with`` block: rank 0 takes its lock, every rank hears whether it
    could, and every rank raises the same :class:`RunDirBusyError` when not. A directory the job already holds
    is entered again without a second lock. ``command`` (default: the job's first) is what the lock file names.
    Call it on every rank alike (it is a collective when the directory is not held yet)."""
    held: HeldLocks = runtime.run_locks
    key = Path(run_dir).resolve()
    if key in held.dirs:
        yield
        return
    held.command = held.command or command or "mllmfl_dist"
    handle = dist.server_first(
        runtime,
        lambda: acquire(key / RUN_LOCK, command or held.command),
        f"rank 0's lock on {key}",
        catch=(RunDirBusyError,),
    )
    held.dirs[key] = handle
    try:
        yield
    finally:
        del held.dirs[key]
        if handle is not None:
            handle.close()


@contextmanager
def holding_report(report_dir: str | Path, command: str, *, wait: bool = False) -> Iterator[None]:
    """Hold ``report_dir`` (a run's report/ folder) in this process for the ``with`` block; the run directory
    itself stays free, so a live run can be reported. ``wait``: wait for another report to end instead of
    raising :class:`RunDirBusyError`."""
    handle = acquire(Path(report_dir) / REPORT_LOCK, command, wait=wait, advice="let that report finish")
    try:
        yield
    finally:
        if handle is not None:
            handle.close()
