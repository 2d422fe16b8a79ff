"""An exclusive file lock for work that several ranks may start at once on one file system.

Ranks of a job cannot elect "the first rank of this node" to do node-local work by ``LOCAL_RANK``: under
torchrun or srun on several nodes every node has a local rank 0, and nodes often share the file system
(two "local rank 0" processes would then write the same files). A ``flock`` on a file beside the work
serialises exactly the processes that share that file, however they are placed: the first does the work,
the others wait and find it done.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


@contextmanager
def exclusive(path: str | Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` (created, with its folder, if missing) for the ``with`` block.
    Yields False, after a warning, where the lock file cannot be made (a read-only folder) or the file
    system refuses locks; concurrent writers must then not collide (see :func:`unique_suffix`)."""
    import fcntl

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
    except OSError as err:
        log.warning("cannot create the lock file %s (%s); processes sharing it may do the same work at once", path, err)
        yield False
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:
            log.warning("cannot lock %s (%s); processes sharing it may do the same work at once", path, err)
            yield False
            return
        yield True  # closing the file releases the lock


def unique_suffix() -> str:
    """A temporary-file suffix no other process writes, on this host or another one sharing the file
    system (process ids repeat across hosts)."""
    return f".tmp-{socket.gethostname()}-{os.getpid()}"
