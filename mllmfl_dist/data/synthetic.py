"""A learnable synthetic source for tests and scale runs: class prototypes plus per-sample noise.

Each class has a fixed prototype image: a per-channel colour plus a coarse (4x4-block) pattern. Coarse
patterns and colours survive random crops of a few pixels, so a small CNN learns the classes even with
augmentation on. Two modes: ``array`` builds one labeled array that is long-tailed and partitioned
like a real dataset; ``on_demand`` stores nothing per client and generates client ``cid``'s samples
from an RNG seeded by ``(seed, cid)``, so any number of clients costs no memory.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import DataConfig, PartitionConfig
from ..core.seeds import TAG_SYNTHETIC_CLIENT, TAG_SYNTHETIC_PROTOTYPES, TAG_SYNTHETIC_TEST, TAG_SYNTHETIC_TRAIN
from .base import ClientData, DataError
from .longtail import longtail_counts
from .partition import METHODS
from .sources import LabeledArrays

# Distinct RNG stream tags (partition.py uses 1xx).

_GRID = 4  # the prototype pattern is constant on blocks of image_size / _GRID pixels
_PATTERN_STD = 48.0  # spread of the block pattern around the class colour, in uint8 units
_MEAN = 0.5
_STD = 0.25


def make_prototypes(num_classes: int, channels: int, image_size: int, seed: int) -> np.ndarray:
    """int16 ``[classes, channels, size, size]`` class prototypes in uint8 units (int16 leaves room for
    the noise before clipping)."""
    rng = np.random.default_rng([seed, TAG_SYNTHETIC_PROTOTYPES])
    colour = rng.uniform(64.0, 192.0, size=(num_classes, channels, 1, 1))
    grid = rng.normal(0.0, _PATTERN_STD, size=(num_classes, channels, _GRID, _GRID))
    block = np.arange(image_size) * _GRID // image_size  # pixel -> grid cell, any image_size
    pattern = grid[:, :, block][:, :, :, block]
    return np.rint(np.clip(colour + pattern, 0, 255)).astype(np.int16)


def render(prototypes: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """uint8 ``[n, C, H, W]``: each label's prototype plus per-pixel noise, clipped to [0, 255].

    The noise is the sum of two uniform draws in [-32, 31] (triangular, std ~26) made from raw random
    bytes: close enough to Gaussian here and about ten times cheaper to draw, which matters because
    on-demand clients are generated on every visit.
    """
    shape = (len(labels), *prototypes.shape[1:])
    raw = np.frombuffer(rng.bytes(2 * int(np.prod(shape))), dtype=np.int8).reshape(2, *shape)
    noise = (raw[0] >> 2) + (raw[1] >> 2)
    images = prototypes[labels] + noise
    np.clip(images, 0, 255, out=images)
    return torch.from_numpy(images.astype(np.uint8))


def _balanced_test_set(prototypes: np.ndarray, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = np.repeat(np.arange(len(prototypes)), per_class)
    images = render(prototypes, labels, np.random.default_rng([seed, TAG_SYNTHETIC_TEST]))
    return images, torch.from_numpy(labels.astype(np.int64))


def _class_names(num_classes: int) -> tuple[str, ...]:
    return tuple(f"class_{c}" for c in range(num_classes))


def synthetic_arrays(data: DataConfig, seed: int) -> LabeledArrays:
    """The balanced array (``samples_per_class`` per class, classes interleaved as in real datasets);
    the caller applies the long tail and partitions it."""
    prototypes = make_prototypes(data.num_classes, data.channels, data.image_size, seed)
    labels = np.tile(np.arange(data.num_classes, dtype=np.int64), data.samples_per_class)
    images = render(prototypes, labels, np.random.default_rng([seed, TAG_SYNTHETIC_TRAIN]))
    test_images, test_labels = _balanced_test_set(prototypes, data.test_per_class, seed)
    return LabeledArrays(
        train_images=images,
        train_labels=labels,
        test_images=test_images,
        test_labels=test_labels,
        class_names=_class_names(data.num_classes),
        mean=(_MEAN,) * data.channels,
        std=(_STD,) * data.channels,
    )


class SyntheticOnDemand(ClientData):
    """Clients generated when asked for; nothing is stored per client.

    Labels follow the long-tail prior ``p_c ∝ longtail_counts(samples_per_class, C, imb_factor)`` (the
    array mode's class proportions); for ``dirichlet``/``creff`` partitions each client's mix is
    ``p * Dir(alpha)`` renormalised, drawn from the client's own RNG, for ``iid`` it is ``p``.
    """

    def __init__(self, data: DataConfig, partition: PartitionConfig, num_clients: int, seed: int) -> None:
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        if partition.method not in METHODS:
            raise DataError(
                f"partition.method = {partition.method!r} is not known; choose one of: {', '.join(METHODS)}"
            )
        self.num_classes = data.num_classes
        self.in_channels = data.channels
        self.image_size = data.image_size
        self.class_names = list(_class_names(data.num_classes))
        self.mean = (_MEAN,) * data.channels
        self.std = (_STD,) * data.channels
        self.num_clients = num_clients
        self._seed = seed
        self._samples_per_client = data.samples_per_client
        self._alpha = partition.alpha
        self._label_skew = partition.method != "iid"
        counts = np.array(longtail_counts(data.samples_per_class, data.num_classes, data.imb_factor), dtype=np.float64)
        self._prior = counts / counts.sum()
        self._prototypes = make_prototypes(data.num_classes, data.channels, data.image_size, seed)
        self._test = _balanced_test_set(self._prototypes, data.test_per_class, seed)

    def client_size(self, client_id: int) -> int:
        self._check_client_id(client_id)
        return self._samples_per_client

    def client(self, client_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        client_id = self._check_client_id(client_id)
        rng = np.random.default_rng([self._seed, TAG_SYNTHETIC_CLIENT, client_id])
        mix = self._prior
        if self._label_skew:
            skewed = self._prior * rng.dirichlet(np.full(self.num_classes, self._alpha))
            total = skewed.sum()
            # A tiny alpha can put the whole Dirichlet draw on classes with prior 0; fall back to the prior.
            mix = skewed / total if total > 0 else self._prior
        labels = rng.choice(self.num_classes, size=self._samples_per_client, p=mix)
        return render(self._prototypes, labels, rng), torch.from_numpy(labels.astype(np.int64))

    def train_class_counts(self) -> list[int]:
        expected = self.num_clients * self._samples_per_client * self._prior
        return [int(round(x)) for x in expected]

    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._test
