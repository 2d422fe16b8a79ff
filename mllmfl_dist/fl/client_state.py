"""Per-client state (SCAFFOLD's control variate c_i, FedDyn's gradient): a sparse store on rank 0, in memory up
to a budget and on disk beyond it, versioned by round, saved with the round's checkpoint.

Like pfl-research's ``pfl/data/user_state.py`` (a store keyed by user id), made durable for resumes. Rank 0 owns
it: clients move between host ranks every round and a multi-node job may lack a shared file system, so the
trainer (:mod:`mllmfl_dist.fl.trainer`) sends the sampled clients' entries with the round's broadcast and gets
the new ones back in their own slots of the round's all_reduce. The store, its files and its determinism are
therefore rank 0's alone, whatever the world size.

Each entry is one flat float32 tensor (the strategy's ``client_state_shapes``, laid out by the trainer). On disk
an entry is ``<directory>/<client>-<round>.pt`` (written atomically: temporary file, fsync, rename), the round
being the one that wrote it. A checkpoint holds the *index* ``{client: round}`` of the entries it saw
(:meth:`ClientStateStore.commit` first writes the entries only held in memory), so a resume from round R's
checkpoint reads every client as of R (:meth:`ClientStateStore.restore` removes the files of other rounds: the
ones a killed run wrote after R). A version superseded after a checkpoint stays on disk until the next checkpoint
is saved (:meth:`ClientStateStore.saved`), so at most two files per client exist: disk grows with the clients
seen, never with the rounds.

Memory: the cached entries (at most ``memory_bytes``, LRU; over it the oldest is written out) plus about 100 bytes
of index per client seen (about 10 MB with 100,000 clients).
"""

from __future__ import annotations

from collections.abc import Sequence

import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from mllmfl_dist.core import checkpoint

_ENTRY = re.compile(r"(\d+)-(\d+)\.pt")


class ClientStateStore:
    """Client id -> flat float32 tensor of that client's newest state (see the module docstring).

    ``directory``: where entries beyond the memory budget and at checkpoints go (None: memory only, no limit,
    nothing durable: for tests and single runs without checkpoints). ``memory_bytes``: the budget of the
    in-memory cache (0: every entry goes to disk at once).
    """

    def __init__(self, directory: str | Path | None, memory_bytes: int):
        self.directory = Path(directory) if directory is not None else None
        self.memory_bytes = int(memory_bytes)
        self._latest: dict[int, int] = {}  # client -> round of its newest entry
        self._committed: dict[int, int] = {}  # client -> round of its entry in the last checkpoint
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()  # least recently used first
        self._cache_bytes = 0
        self._dirty: set[int] = set()  # cached entries whose newest version is on no disk yet
        self._superseded: list[tuple[int, int]] = []  # committed versions replaced since the last commit
        self._deletable: list[tuple[int, int]] = []  # ... of the commit before: gone once that checkpoint is saved

    # -- reading and writing --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._latest)

    def __contains__(self, client: int) -> bool:
        return client in self._latest

    def version(self, client: int) -> int | None:
        """The round that wrote ``client``'s newest entry (None: never written)."""
        return self._latest.get(client)

    def get(self, client: int) -> torch.Tensor | None:
        """``client``'s newest entry (flat float32, CPU; do not modify it), None if it never had one."""
        round_index = self._latest.get(client)
        if round_index is None:
            return None
        cached = self._cache.get(client)
        if cached is not None:
            self._cache.move_to_end(client)
            return cached
        tensor: torch.Tensor = torch.load(self._path(client, round_index), weights_only=True)
        self._remember(client, tensor, dirty=False)
        return tensor

    def fill_slots(self, states: torch.Tensor, present: torch.Tensor, clients: Sequence[int]) -> None:
        """Copy the entries of ``clients`` into rows of ``states`` [K, S] (row i: ``clients[i]``) and flag them
        in ``present`` [K]; rows of clients without an entry, and rows past ``clients``, are zeros."""
        states.zero_()
        present.zero_()
        for slot, client in enumerate(clients):
            entry = self.get(client)
            if entry is not None:
                states[slot].copy_(entry)
                present[slot] = 1.0

    def put(self, client: int, round_index: int, state: torch.Tensor) -> None:
        """Make ``state`` (flat, any float dtype, stored as float32) ``client``'s entry as written by round
        ``round_index``."""
        old = self._latest.get(client)
        if old is not None and old != round_index:
            if self._committed.get(client) == old:
                self._superseded.append((client, old))  # the last checkpoint still needs it
            else:  # a version written after the last checkpoint: no checkpoint will ever read it
                self._unlink(client, old)
        self._forget_cached(client)
        self._latest[client] = int(round_index)
        self._remember(client, state.detach().to("cpu", torch.float32).clone(), dirty=True)

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def commit(self) -> dict[str, torch.Tensor]:
        """Write every entry only held in memory and return the index a checkpoint keeps: ``{"clients": int64
        [M], "rounds": int64 [M]}``. The files this index supersedes go once :meth:`saved` says it is saved."""
        for client in sorted(self._dirty):
            self._write(client, self._latest[client], self._cache[client])
        self._dirty.clear()
        self._deletable.extend(self._superseded)
        self._superseded = []
        self._committed = dict(self._latest)
        clients = sorted(self._latest)
        return {
            "clients": torch.tensor(clients, dtype=torch.int64),
            "rounds": torch.tensor([self._latest[c] for c in clients], dtype=torch.int64),
        }

    def saved(self) -> None:
        """The checkpoint holding the last :meth:`commit`'s index is on disk: remove what only older ones read."""
        for client, round_index in self._deletable:
            self._unlink(client, round_index)
        self._deletable = []

    def restore(self, index: dict[str, Any] | None) -> None:
        """Start from a checkpoint's index (None: from nothing): every client reads its entry as of that
        checkpoint; files of other versions (written after it by a run that was killed, or superseded) and
        temporary files of a killed write are removed."""
        self._cache.clear()
        self._cache_bytes = 0
        self._dirty.clear()
        self._superseded, self._deletable = [], []
        pairs = zip(index["clients"].tolist(), index["rounds"].tolist()) if index else ()
        self._latest = {int(c): int(r) for c, r in pairs}
        self._committed = dict(self._latest)
        if self.directory is None:
            if self._latest:
                raise RuntimeError("a memory-only client state store cannot restore a checkpoint's entries")
            return
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_stale_temps(self.directory)
        for entry in os.scandir(self.directory):
            match = _ENTRY.fullmatch(entry.name)
            if match and self._latest.get(int(match[1])) != int(match[2]):
                os.unlink(entry.path)
        missing = [c for c, r in self._latest.items() if not self._path(c, r).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{self.directory} lacks the state of {len(missing)} client(s) the checkpoint "
                f"names (e.g. {self._path(missing[0], self._latest[missing[0]]).name}); it "
                f"cannot be resumed"
            )

    # -- what it costs -----------------------------------------------------------------------------------------------
    @property
    def memory_used(self) -> int:
        """Bytes of the entries cached in memory."""
        return self._cache_bytes

    def disk_bytes(self) -> int:
        """Bytes of the entry files on disk."""
        if self.directory is None or not self.directory.is_dir():
            return 0
        return sum(e.stat().st_size for e in os.scandir(self.directory) if _ENTRY.fullmatch(e.name))

    # -- inside -------------------------------------------------------------------------------------------------------
    def _path(self, client: int, round_index: int) -> Path:
        if self.directory is None:
            raise RuntimeError("a memory-only client state store has no files")
        return self.directory / f"{client}-{round_index}.pt"

    def _write(self, client: int, round_index: int, tensor: torch.Tensor) -> None:
        if self.directory is not None:
            checkpoint.save_atomic(tensor, self._path(client, round_index))

    def _unlink(self, client: int, round_index: int) -> None:
        if self.directory is not None:
            self._path(client, round_index).unlink(missing_ok=True)

    def _forget_cached(self, client: int) -> None:
        cached = self._cache.pop(client, None)
        if cached is not None:
            self._cache_bytes -= cached.numel() * cached.element_size()
        self._dirty.discard(client)

    def _remember(self, client: int, tensor: torch.Tensor, dirty: bool) -> None:
        self._forget_cached(client)
        self._cache[client] = tensor
        self._cache_bytes += tensor.numel() * tensor.element_size()
        if dirty:
            self._dirty.add(client)
        if self.directory is None:
            return
        while self._cache_bytes > self.memory_bytes and self._cache:
            victim, evicted = self._cache.popitem(last=False)
            self._cache_bytes -= evicted.numel() * evicted.element_size()
            if victim in self._dirty:
                self._dirty.discard(victim)
                self._write(victim, self._latest[victim], evicted)
