"""Caches of computed tensors (teacher outputs), keyed by what they were computed from.

A cache file is a dict saved atomically with its ``key``: a SHA-256 over a JSON description of the
computation (model, settings, class names, a version) and the bytes of every input. A reader takes the file
only when it loads with ``weights_only=True``, holds that key and passes the caller's shape check; a missing
file is a miss, and a torn, foreign or stale one is a miss with a warning (the caller recomputes and
overwrites it). A hit loads no model at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mllmfl_dist.core import checkpoint

log = logging.getLogger(__name__)


def content_key(meta: dict[str, Any], chunks: Iterable[bytes] = ()) -> str:
    """SHA-256 (hex) of ``meta`` (JSON, sorted keys) followed by ``chunks`` (the inputs' bytes, in order)."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def read_cache(path: str | Path, key: str, fits: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any] | None:
    """The stored dict at ``path`` when it holds ``key`` and ``fits(stored)``; None otherwise (``what`` names
    the cache in the warning)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        stored = checkpoint.load(path)
        if isinstance(stored, dict) and stored.get("key") == key and fits(stored):
            return stored
        log.warning("%s %s does not match this data; recomputing", what, path)
    except Exception as err:  # noqa: BLE001 - a torn or foreign file: recompute and overwrite
        log.warning("%s %s unreadable (%s); recomputing", what, path, type(err).__name__)
    return None


def write_cache(path: str | Path, key: str, values: dict[str, Any]) -> None:
    """Save ``values`` with ``key`` atomically (the reader checks the key)."""
    checkpoint.save_atomic({"key": key, **values}, path)
