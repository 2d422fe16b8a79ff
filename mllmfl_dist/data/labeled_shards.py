"""Labeled WebDataset shards as a client-data source (``data.source = "shards"``): train and test shards,
class names from ``classes.json`` (or ``class_<i>``), per-channel statistics of the train images."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .base import DataError
from .images import ImageBounds
from .shards import CLASSES_FILE, describe_shape, expand_shards, read_classes, read_labeled_shards
from .sources import LabeledArrays


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def resolve_pattern(pattern: str, key: str) -> list[Path]:
    """:func:`expand_shards` for the config key ``key``; a relative pattern that matches nothing from the
    working directory is tried from the repository root, where the shipped ``shards/`` lives."""
    if not pattern.strip():
        raise DataError(
            f"{key} is empty; set it to a shard pattern such as shards/fmnist_lt/train-*.tar.gz (--set {key}=PATTERN)"
        )
    try:
        return expand_shards(pattern)
    except DataError as err:
        first = err
    root = _repo_root()
    if not os.path.isabs(os.path.expanduser(pattern)) and (root / "shards").is_dir() and root != Path.cwd().resolve():
        try:
            return expand_shards(str(root / pattern))
        except DataError:
            pass
    raise DataError(f"{key} = {pattern!r}: {first}; set {key} (--set {key}=PATTERN) to existing shards")


def load_labeled_shards(
    train_pattern: str,
    test_pattern: str,
    train_key: str = "data.train_shards",
    test_key: str = "data.test_shards",
    bounds: ImageBounds | None = None,
):
    """Labeled train and test shards as :class:`~mllmfl_dist.data.sources.LabeledArrays`.

    Class names come from ``classes.json`` beside the first train shard, else ``class_<i>`` up to the
    largest label. mean/std are the per-channel statistics of the train images. An image over ``bounds``
    (``data.max_image_*``) is a :class:`DataError` naming the shard and the member.
    """
    train_paths = resolve_pattern(train_pattern, train_key)
    test_paths = resolve_pattern(test_pattern, test_key)
    train_images, train_labels, _ = read_labeled_shards(train_paths, bounds)
    test_images, test_labels, _ = read_labeled_shards(test_paths, bounds)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(
            f"{test_key}: test images are {describe_shape(tuple(test_images.shape[1:]))}, the train "
            f"images ({train_key}) {describe_shape(tuple(train_images.shape[1:]))}"
        )
    largest = int(max(train_labels.max(), test_labels.max()))
    names = read_classes(train_paths[0].parent)
    if names is None:
        # Without classes.json the class count is the largest label + 1; labels with gaps (a stray 999 among
        # 0..9) would build a model with hundreds of classes no sample belongs to.
        empty = sorted(set(range(largest + 1)) - set(train_labels.unique().tolist()))
        if empty:
            shown = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
            raise DataError(
                f"{train_key}: labels go up to {largest} but {len(empty)} of the classes 0..{largest} "
                f"have no training sample ({shown}) and there is no {CLASSES_FILE} beside "
                f"{train_paths[0]}; number the classes 0..C-1, or write {CLASSES_FILE} (a JSON list of "
                "the C class names) there"
            )
        names = [f"class_{c}" for c in range(largest + 1)]
    elif largest >= len(names):
        raise DataError(
            f"{train_key}: label {largest} is out of range for the {len(names)} classes of "
            f"{train_paths[0].parent / CLASSES_FILE}"
        )
    mean, std = channel_stats(train_images)
    return LabeledArrays(
        train_images=train_images,
        train_labels=train_labels.numpy(),
        test_images=test_images,
        test_labels=test_labels,
        class_names=tuple(names),
        mean=mean,
        std=std,
    )


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 ``[N, C, H, W]`` images in [0, 1] units, exact
    from a 256-bin histogram per channel, so no float copy of the images is made."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        total = hist.sum()
        mean = float((hist * values).sum() / total)
        var = float((hist * (values - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(max(var, 0.0) ** 0.5 or 1.0)  # a constant channel normalises by 1, not 0
    return tuple(means), tuple(stds)
