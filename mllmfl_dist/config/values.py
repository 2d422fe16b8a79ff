"""The parser of ``data.train_indices`` ranges: the config check and the code that uses the value
(data/build.py) read it through the same function, so a value the check accepts is one the code understands.
"""

from __future__ import annotations


def parse_index_range(text: str) -> slice:
    """``"start:stop"`` (either side may be empty) -> ``slice(start, stop)``; ``""`` -> ``slice(None)``.
    Raises ValueError for anything else."""
    if not text.strip():
        return slice(None)
    start, sep, stop = text.strip().partition(":")
    if not sep or ":" in stop:
        raise ValueError(text)
    lo, hi = (int(part) if part.strip() else None for part in (start, stop))
    if any(b is not None and b < 0 for b in (lo, hi)):
        raise ValueError(text)
    if lo is not None and hi is not None and lo >= hi:
        raise ValueError(text)
    return slice(lo, hi)


def valid_index_range(text: str) -> bool:
    try:
        parse_index_range(text)
    except ValueError:
        return False
    return True
