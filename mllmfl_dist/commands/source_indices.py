"""Which samples of a source split ``shards`` and ``web_corpus`` pack: an index range, then the first samples
of each class, then the package's long tail. Imports no numpy at load (the CLI's parsers import this)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from mllmfl_dist.core.errors import DataError

if TYPE_CHECKING:
    import numpy as np


def parse_indices(text: str | None, total: int) -> tuple[int, int]:
    """``START:STOP`` (either may be empty) as a range inside ``[0, total)``."""
    if text is None:
        return 0, total
    match = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", text)
    if not match:
        raise DataError(f"--indices {text!r}: expected START:STOP such as 0:59488")
    start = int(match.group(1)) if match.group(1) else 0
    stop = int(match.group(2)) if match.group(2) else total
    if not 0 <= start < stop <= total:
        raise DataError(f"--indices {text}: need 0 <= START < STOP <= {total} (the split's size)")
    return start, stop


def select_indices(
    labels: np.ndarray, num_classes: int, start: int, stop: int, per_class: int | None, imb_factor: float | None
) -> np.ndarray:
    """Sorted indices of the samples to pack: the range, then the first ``per_class`` of each class, then
    the package's long tail (:func:`~mllmfl_dist.data.longtail_indices`)."""
    import numpy as np

    from mllmfl_dist.data.longtail import longtail_indices

    chosen = np.arange(start, stop, dtype=np.int64)
    if per_class is not None:
        sub = labels[chosen]
        order = np.argsort(sub, kind="stable")
        rank = np.empty(len(sub), dtype=np.int64)
        counts = np.bincount(sub, minlength=num_classes)
        firsts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank[order] = np.arange(len(sub)) - np.repeat(firsts, counts)  # position within its class
        chosen = chosen[rank < per_class]
    if imb_factor is not None:
        chosen = chosen[longtail_indices(labels[chosen], num_classes, imb_factor)]
    return chosen
