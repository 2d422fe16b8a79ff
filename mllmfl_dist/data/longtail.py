"""The exponential long tail of CReFF/CLIP2FL: class ``c`` keeps ``int(n_max * IF ** (c / (C - 1)))``."""

from __future__ import annotations

import numpy as np


def longtail_counts(n_max: int, num_classes: int, imb_factor: float) -> list[int]:
    """Samples kept per class; class 0 is the head (``n_max``), class ``C-1`` the tail (``n_max * IF``)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if num_classes == 1:
        return [int(n_max)]
    # Same float expression as CReFF's get_img_num_per_cls, so the integer truncation matches exactly.
    return [int(n_max * imb_factor ** (c / (num_classes - 1.0))) for c in range(num_classes)]


def longtail_indices(labels: np.ndarray, num_classes: int, imb_factor: float) -> np.ndarray:
    """Sorted indices of the long-tailed subset of a balanced labeled set.

    ``n_max`` is the largest class count of ``labels``; class ``c`` keeps its first ``count[c]``
    indices in their original order (as CReFF does), or all of them if it has fewer.
    """
    labels = np.asarray(labels)
    per_class = np.bincount(labels, minlength=num_classes)
    if len(per_class) > num_classes:
        raise ValueError(f"labels contain class {len(per_class) - 1} >= num_classes ({num_classes})")
    counts = longtail_counts(int(per_class.max()), num_classes, imb_factor)
    # A stable sort groups indices by class while keeping each class's original order.
    by_class = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(per_class)[:-1]])
    keep = [by_class[start : start + min(count, have)] for start, count, have in zip(starts, counts, per_class)]
    return np.sort(np.concatenate(keep)).astype(np.int64)
