"""``build_client_data``: from the data/partition config to per-client data."""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..config import DataConfig, PartitionConfig, parse_index_range
from ..config.fields import choices_of
from ..core.seeds import TAG_LONGTAIL, TAG_TRAIN_FRACTION, derive_seed
from .base import ArrayClientData, ClientData, DataError
from .fraction import fraction_indices
from .images import ImageBounds
from .imagenet_lt import load_imagenet_lt
from .longtail import longtail_indices
from .partition import partition_indices
from .labeled_shards import load_labeled_shards
from .sources import LabeledArrays, load_cifar, load_fashion_mnist
from .synthetic import SyntheticOnDemand, synthetic_arrays

log = logging.getLogger(__name__)

SOURCES = choices_of(DataConfig, "source")  # the schema's list, the one home of the names
# Sources whose train split is long-tailed as published: data.imb_factor is not applied to them again.
LONGTAILED_SOURCES = ("imagenet_lt",)


def build_client_data(data: DataConfig, partition: PartitionConfig, num_clients: int, seed: int) -> ClientData:
    """Load ``data.source``, apply the long tail, and split it among ``num_clients`` clients.

    From the training split (``data.train_indices`` of it): the server's holdout (the last
    ``server_holdout_per_class`` images of each class), then the validation split (the
    ``val_per_class`` images of each class just before the holdout's), then the long tail of the rest, then
    ``data.train_fraction`` of each class, then the partition. Deterministic in its arguments, so every
    process builds the same clients without communicating.
    """
    if seed < 0:
        raise DataError(f"run.seed = {seed} is not allowed; it must be >= 0")
    if data.source == "synthetic" and data.synthetic_mode == "on_demand":
        # Generated clients hold no fixed images to carve a split or a fraction from.
        for key, value, off in (("val_per_class", data.val_per_class, 0), ("train_fraction", data.train_fraction, 1)):
            if value != off:
                raise DataError(
                    f"data.{key} = {value:g} needs fixed training images; data.synthetic_mode = "
                    f"'on_demand' has none: set data.{key} = {off} or data.synthetic_mode = 'array'"
                )
        return SyntheticOnDemand(data, partition, num_clients, seed)
    arrays = _load_arrays(data, seed)
    num_classes = len(arrays.class_names)
    usable = _usable_indices(data.train_indices, len(arrays.train_labels))
    holdout = usable[_holdout_indices(arrays.train_labels[usable], num_classes, data.server_holdout_per_class)]
    # The long tail is cut from what the server did not hold back, so its pool is disjoint from every client.
    remaining = np.setdiff1d(usable, holdout)
    # Validation images come next, before the long tail, so the split is balanced (and the holdout is the
    # same images with or without it); with val_per_class = 0 nothing moves.
    val = remaining[
        _holdout_indices(arrays.train_labels[remaining], num_classes, data.val_per_class, "data.val_per_class")
    ]
    remaining = np.setdiff1d(remaining, val)
    if data.source in LONGTAILED_SOURCES:
        if data.imb_factor < 1:
            log.info(
                "data.imb_factor = %g is ignored: the %s train list is long-tailed already",
                data.imb_factor,
                data.source,
            )
        kept = remaining
    else:
        kept = remaining[
            longtail_indices(
                arrays.train_labels[remaining], num_classes, data.imb_factor, seed=derive_seed(seed, TAG_LONGTAIL)
            )
        ]
        empty = [c for c, n in enumerate(np.bincount(arrays.train_labels[kept], minlength=num_classes)) if n == 0]
        if empty:
            raise DataError(
                f"data.imb_factor = {data.imb_factor:g} leaves class(es) {empty} with no training "
                f"samples; raise data.imb_factor (or add data)"
            )
    if data.train_fraction < 1:
        kept = kept[
            fraction_indices(
                arrays.train_labels[kept], num_classes, data.train_fraction, seed=derive_seed(seed, TAG_TRAIN_FRACTION)
            )
        ]
        log.info("data.train_fraction = %g: the clients hold %d training images", data.train_fraction, len(kept))
    parts = partition_indices(
        arrays.train_labels[kept],
        num_classes,
        num_clients,
        partition.method,
        partition.alpha,
        seed,
        self_balancing=partition.self_balancing,
        min_partition_size=partition.min_partition_size,
        shards_per_client=partition.shards_per_client,
    )
    return ArrayClientData(
        images=arrays.train_images,
        labels=torch.from_numpy(arrays.train_labels),
        # Partition indices point into the long-tailed subset; map them back to the full array so the
        # images are never copied.
        client_indices=[kept[part] for part in parts],
        test_images=arrays.test_images,
        test_labels=arrays.test_labels,
        num_classes=num_classes,
        class_names=arrays.class_names,
        mean=arrays.mean,
        std=arrays.std,
        server_pool=holdout,
        val_indices=val,
    )


def _usable_indices(text: str, total: int) -> np.ndarray:
    """The training-split indices ``data.train_indices`` allows (all of them for "")."""
    window = parse_index_range(text)
    if window.stop is not None and window.stop > total:
        raise DataError(f"data.train_indices = {text!r} reaches past the training split ({total} samples)")
    return np.arange(total, dtype=np.int64)[window]


def _holdout_indices(
    labels: np.ndarray, num_classes: int, per_class: int, key: str = "data.server_holdout_per_class"
) -> np.ndarray:
    """The last ``per_class`` training images of each class (sorted): the server's holdout, and (drawn from
    what the holdout left) the validation split; ``key`` is the setting a DataError names."""
    if per_class == 0:
        return np.zeros(0, dtype=np.int64)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) <= per_class:
            raise DataError(f"{key} = {per_class} leaves class {c} no training images (it has {len(members)})")
        chosen.append(members[-per_class:])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _load_arrays(data: DataConfig, seed: int) -> LabeledArrays:
    if data.source == "synthetic":
        if data.synthetic_mode != "array":
            raise DataError(f"data.synthetic_mode = {data.synthetic_mode!r} is not known; choose array or on_demand")
        return synthetic_arrays(data, seed)
    if data.source == "fashion_mnist":
        return load_fashion_mnist(data.root)
    if data.source in ("cifar10", "cifar100"):
        return load_cifar(data.source, data.root, data.download)
    if data.source == "imagenet_lt":
        # The OLTR list files; the long tail is in the train list (LONGTAILED_SOURCES skips imb_factor).
        return load_imagenet_lt(data.root, data.lists_dir, data.image_size, ImageBounds.of(data, "data"))
    if data.source == "shards":
        # Labeled WebDataset shards (shards/README.md); already long-tailed sets use imb_factor = 1.0.
        return load_labeled_shards(data.train_shards, data.test_shards, bounds=ImageBounds.of(data, "data"))
    raise DataError(f"data.source = {data.source!r} is not known; choose one of: {', '.join(SOURCES)}")
