"""Waits on other ranks: bounded, announced while long, and explained when they end.

Two signs in the rendezvous store tell a waiting rank who holds it up, without the collective's help:
arrival marks (``wait/<n>/<rank>``: rank r has reached the n-th wait) and heartbeats (``beat/<rank>``, a
counter every process bumps each :data:`HEARTBEAT_SECONDS` from a daemon thread). A rank that has not
arrived is *not there yet*; a rank that has arrived but whose counter stopped moving has been stopped
(SIGSTOP, a frozen node) inside the collective. Without the heartbeat that second kind could not be named:
its arrival mark is set, so it looked like every rank was there.

Only the store is used here (``store.set``, ``add``, ``check``, ``delete_key``); torch.distributed itself
stays in :mod:`mllmfl_dist.core.dist`. Store failures are ``RuntimeError`` (torch's ``DistError`` is one).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from mllmfl_dist.core.errors import RankLostError

if TYPE_CHECKING:
    from types import TracebackType

    from mllmfl_dist.core.dist import Runtime

STALE_WAITS = 64
HEARTBEAT_SECONDS = 1.0
# A counter that has not moved over this long (three missed beats) belongs to a stopped process.
SILENT_SECONDS = 3.0
log = logging.getLogger(__name__)


@dataclass
class WaitSettings:
    """How long each kind of wait on another rank may last, when to start saying so, and the count of waits
    so far (every rank runs the same sequence, so the n-th wait is the same one on every rank)."""

    round_minutes: float = 30.0  # dist.timeout_minutes
    control_minutes: float = 1440.0  # dist.control_timeout_minutes
    report_seconds: float = 60.0  # dist.wait_report_seconds
    count: int = 0


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def ranks_text(ranks: list[int] | None) -> str:
    return "?" if not ranks else ", ".join(map(str, ranks))


class Heartbeat:
    """This process's sign of life: ``beat/<rank>`` in ``store`` goes up by one every
    :data:`HEARTBEAT_SECONDS` until :meth:`stop` (or until the store is gone). A daemon thread, so a stopped
    or killed process stops beating with it, which is the point."""

    def __init__(self, store: Any, rank: int):
        self.store, self.key = store, f"beat/{rank}"
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mllmfl-heartbeat")
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self.store.add(self.key, 1)
            except RuntimeError:
                return  # the store's host is gone; the waits report that themselves
            if self._done.wait(HEARTBEAT_SECONDS):
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=2 * HEARTBEAT_SECONDS)


class Waiting:
    """Around one wait on other ranks: says what it waits for once the wait is long (after
    ``wait_report_seconds``, then at doubling intervals, naming the ranks not there yet and those gone
    silent), and turns an expired or broken wait into one :class:`RankLostError` naming them and the key of
    the timeout."""

    def __init__(self, runtime: Runtime, what: str, key: str, minutes: float):
        self.runtime, self.what, self.key, self.minutes = runtime, what, key, minutes
        self.store = runtime.store if runtime.distributed else None
        self.silent: list[int] = []  # arrived, but their heartbeat stopped (set by the watcher thread)
        self._done = threading.Event()

    def arrival_key(self, rank: int) -> str:
        return f"wait/{self.seq}/{rank}"

    def missing(self) -> list[int] | None:
        """The ranks that have not reached this wait; None when the store itself is gone."""
        if self.store is None:  # a single process: no other rank to wait for
            return []
        try:
            return [r for r in range(self.runtime.world_size) if not self.store.check([self.arrival_key(r)])]
        except RuntimeError:
            return None

    def _beats(self) -> list[int] | None:
        if self.store is None:
            return None
        try:
            return [int(self.store.add(f"beat/{r}", 0)) for r in range(self.runtime.world_size)]
        except RuntimeError:
            return None

    def __enter__(self) -> Waiting:
        if self.store is None:
            return self
        self.runtime.waits.count += 1
        self.seq = self.runtime.waits.count
        self.started = time.monotonic()
        try:
            self.store.set(self.arrival_key(self.runtime.rank), "1")
            # Keep the store small. No rank runs more than a few waits ahead of another (every round has an
            # all_reduce), so a mark this old is read by nobody any more.
            if self.seq > STALE_WAITS:
                self.store.delete_key(f"wait/{self.seq - STALE_WAITS}/{self.runtime.rank}")
        except RuntimeError:
            pass
        threading.Thread(target=self._watch, daemon=True, name="mllmfl-wait").start()
        return self

    def _watch(self) -> None:
        # Heartbeats are read only in waits already half-way to their first report, so the many short waits
        # (every round's all_reduce) cost the store nothing.
        report = self.runtime.waits.report_seconds
        interval, report_at, sample_from = report, self.started + report, self.started + report / 2
        sampled, beats = 0.0, None
        while not self._done.wait(min(HEARTBEAT_SECONDS, report / 2)):
            now = time.monotonic()
            if now >= sample_from and now - sampled >= SILENT_SECONDS:
                fresh = self._beats()
                if beats is not None and fresh is not None:  # ranks not there yet are told apart in _who
                    self.silent = [
                        r
                        for r, (a, b) in enumerate(zip(beats, fresh, strict=True))
                        if a == b and r != self.runtime.rank
                    ]
                sampled, beats = now, fresh
            if now >= report_at:
                log.warning(
                    "rank %d: waiting %.0f s for %s; %s (gives up after %s = %g min)",
                    self.runtime.rank,
                    now - self.started,
                    self.what,
                    self._who(self.missing(), final=False),
                    self.key,
                    self.minutes,
                )
                interval *= 2
                report_at = now + interval

    def _who(self, missing: list[int] | None, final: bool) -> str:
        if missing is None:
            return "the rendezvous store is gone (its host, rank 0 or the agent, died?), so no rank can be named"
        silent = [r for r in self.silent if r not in missing]
        parts = []
        if missing:
            parts.append(f"rank(s) {ranks_text(missing)} {'never arrived' if final else 'not there yet'}")
        if silent:
            parts.append(
                f"rank(s) {ranks_text(silent)} arrived but "
                f"{'went silent' if final else f'silent for {SILENT_SECONDS:g} s or more'}"
            )
        if not parts:
            return "every rank arrived and is alive (a hung collective?)" if final else "every rank has arrived"
        return "; ".join(parts) + (" (stopped or hung?)" if final else "")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        self._done.set()
        if self.store is None or exc is None or isinstance(exc, RankLostError):
            return False
        if not isinstance(exc, RuntimeError):
            return False
        missing = self.missing()
        waited = (time.monotonic() - self.started) / 60
        me = f"rank {self.runtime.rank}"
        if waited < 0.9 * self.minutes:  # not a timeout: a connection broke
            gone = None if missing is None else sorted(set(missing) | set(self.silent))
            raise RankLostError(
                f"{me}: {self.what} broke after {waited * 60:.0f} s: rank(s) {ranks_text(gone)} "
                f"dropped out (killed or crashed?): {first_line(exc)}"
            ) from None
        raise RankLostError(
            f"{me}: gave up on {self.what} after {waited:.1f} min ({self.key} = {self.minutes:g}); "
            f"{self._who(missing, final=True)}"
        ) from None
