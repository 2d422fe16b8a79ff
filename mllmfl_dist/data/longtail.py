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


def longtail_indices(labels: np.ndarray, num_classes: int, imb_factor: float, seed: int | None = None) -> np.ndarray:
    """Sorted indices of the long-tailed subset of a balanced labeled set.

    ``n_max`` is the largest class count of ``labels``; class ``c`` keeps ``count[c]`` of its indices (all
    of them if it has fewer). With a ``seed`` they are a random subset: each class's indices are shuffled
    by a generator seeded with ``(seed, c)`` before the first ``count[c]`` are kept, as CReFF's
    ``train_long_tail`` does (``np.random.shuffle`` per class; ours is seeded per class so the subset does
    not depend on the other classes). Without one, the first ``count[c]`` in index order (how the shipped
    shards were cut, so ``shards/build.sh`` stays byte-identical).
    """
    labels = np.asarray(labels)
    per_class = np.bincount(labels, minlength=num_classes)
    if len(per_class) > num_classes:
        raise ValueError(f"labels contain class {len(per_class) - 1} >= num_classes ({num_classes})")
    counts = longtail_counts(int(per_class.max()), num_classes, imb_factor)
    keep = []
    for c, count in enumerate(counts):
        members = np.flatnonzero(labels == c)
        if seed is not None:
            members = np.random.default_rng([seed, c]).permutation(members)
        keep.append(members[:count])
    return np.sort(np.concatenate(keep)).astype(np.int64)
