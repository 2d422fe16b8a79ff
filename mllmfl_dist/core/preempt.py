"""Preemption: a stop request by signal, honoured at the next boundary of federated rounds.

Slurm warns a job before its time limit (or before preempting it) with the signal named in
``--signal`` (the launch scripts ask for SIGUSR1). The handler only records the request
(:class:`StopRequest`, created when the CLI starts and carried by the runtime); each rank adds it to the
round's one all_reduce, so every rank learns after the same round whether any rank was asked to stop,
all stop after that round, rank 0 writes a checkpoint of it, and the process exits with
:data:`PREEMPTED_EXIT`. Rerunning the same command resumes there (the Slurm scripts requeue the job).

The request is made when the process starts, not in the trainer, because a signal can arrive in any
stage: one that arrives during annotation or pretraining is remembered and stops federated finetuning
after its first round.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNAL = signal.SIGUSR1
# EX_TEMPFAIL from sysexits.h: "temporary failure; the user is invited to retry", which is what a
# preempted run is. The Slurm scripts requeue on it.
PREEMPTED_EXIT = 75


class Preempted(Exception):
    """Raised on every rank after a stop at a round boundary, once rank 0's checkpoint is on disk."""

    def __init__(self, round_index: int, rounds: int, checkpoint: Path, reason: str):
        self.round_index, self.rounds, self.checkpoint, self.reason = round_index, rounds, checkpoint, reason
        super().__init__(
            f"preempted: stopped after round {round_index} of {rounds} on {reason}; checkpoint {checkpoint}; "
            f"rerun the same command to resume from round {round_index + 1}"
        )


class StopRequest:
    """Whether this process was asked to stop (by :data:`STOP_SIGNAL`), and by which signal.

    ``install`` makes the signal set the request instead of killing the process (its default action) or
    being ignored (the launch scripts set SIG_IGN so that no rank dies of it before this runs). The
    handler only records the request: it runs between bytecodes of the main thread, possibly inside a
    collective, where nothing else is safe to do."""

    def __init__(self) -> None:
        self.reason: str | None = None  # the name of the signal that asked for a stop, once one has

    def install(self) -> bool:
        """Catch :data:`STOP_SIGNAL` from now on; False where signals cannot be caught (not the main
        thread)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        signal.signal(STOP_SIGNAL, self._handle)
        return True

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.reason = signal.Signals(signum).name


def exiting() -> None:
    """Called once every rank has agreed to stop and the checkpoint is on disk: from here on SIGTERM is
    ignored. The ranks exit within moments of each other, but srun --kill-on-bad-exit and torchrun
    terminate the others as soon as the first exits; without this, those would end with 143 instead of
    :data:`PREEMPTED_EXIT` and the job log would not say that they stopped on purpose. (SIGKILL, which
    follows a SIGTERM that is ignored for long, still ends a rank that hangs.)"""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
