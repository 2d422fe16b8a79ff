"""``data.train_fraction``: the clients hold only a seeded fraction of each class (the low-data experiment)."""

from __future__ import annotations

import numpy as np


def fraction_counts(class_counts: np.ndarray, fraction: float) -> np.ndarray:
    """Images kept per class: ``fraction * n_c`` rounded half up, at least 1 for a class that has any (so the
    long tail's last class survives a small fraction), at most ``n_c``."""
    counts = np.asarray(class_counts, dtype=np.int64)
    kept = np.floor(counts * float(fraction) + 0.5).astype(np.int64)
    return np.minimum(np.maximum(kept, (counts > 0).astype(np.int64)), counts)


def fraction_indices(labels: np.ndarray, num_classes: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices (into ``labels``) of ``fraction_counts`` images of each class, drawn at random.

    Each class's indices are permuted by a generator seeded with ``(seed, c)`` and the first ones kept, as
    :func:`~mllmfl_dist.data.longtail.longtail_indices` draws the long tail: a class's subset depends on the
    seed and that class alone, and a smaller fraction keeps a subset of a larger one's images (same seed).
    Raises ValueError for a fraction outside (0, 1].
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    counts = fraction_counts(np.bincount(labels, minlength=num_classes), fraction)
    keep = [
        np.random.default_rng([seed, c]).permutation(np.flatnonzero(labels == c))[:count]
        for c, count in enumerate(counts)
    ]
    return np.sort(np.concatenate(keep)).astype(np.int64)
