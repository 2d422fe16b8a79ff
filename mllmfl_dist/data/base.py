"""The per-client data interface every source returns, and its in-memory array implementation."""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np
import torch

from ..core.errors import DataError

__all__ = ["ArrayClientData", "ClientData", "DataError"]


class ClientData(abc.ABC):
    """Per-client training data plus the shared balanced test set.

    Images are uint8 ``[n, C, H, W]`` so a whole client fits in memory cheaply; augmentation and
    normalisation happen later on whole batches (see :mod:`mllmfl_dist.data.augment`).
    """

    num_classes: int
    in_channels: int
    image_size: int  # square images, H == W
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_clients: int

    @abc.abstractmethod
    def client_size(self, client_id: int) -> int:
        """Number of training samples of ``client_id`` (>= 1)."""

    @abc.abstractmethod
    def client(self, client_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images uint8 ``[n, C, H, W]`` and labels int64 ``[n]`` of ``client_id``."""

    @abc.abstractmethod
    def train_class_counts(self) -> list[int]:
        """Samples per class in the whole long-tailed training set (defines Many/Medium/Few)."""

    @abc.abstractmethod
    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The balanced test set: images uint8 ``[n, C, H, W]`` and labels int64 ``[n]``."""

    def val_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The validation split (``data.val_per_class`` images per class from the training split, never a
        client's): images uint8 ``[n, C, H, W]`` and labels int64 ``[n]``; empty (n = 0) without one."""
        return (
            torch.zeros((0, self.in_channels, self.image_size, self.image_size), dtype=torch.uint8),
            torch.zeros(0, dtype=torch.int64),
        )

    def client_class_counts(self) -> np.ndarray | None:
        """``[num_clients, num_classes]`` int64 samples of each class per client; None where clients are
        generated on demand (no fixed samples)."""
        return None

    def _check_client_id(self, client_id: int) -> int:
        client_id = int(client_id)
        if not 0 <= client_id < self.num_clients:
            raise IndexError(f"client_id {client_id} out of range [0, {self.num_clients})")
        return client_id


class ArrayClientData(ClientData):
    """Clients as index arrays into one in-memory training array.

    The per-client indices are kept as one flat array plus offsets rather than a list of arrays, so
    100,000 clients cost two numpy arrays instead of 100,000 Python objects.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        client_indices: Sequence[np.ndarray],
        test_images: torch.Tensor,
        test_labels: torch.Tensor,
        num_classes: int,
        class_names: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        server_pool: np.ndarray | None = None,
        val_indices: np.ndarray | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[2] != images.shape[3]:
            raise ValueError(f"images must be uint8 [N, C, H, H], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        if len(client_indices) == 0:
            raise ValueError("client_indices is empty")
        self.num_classes = int(num_classes)
        self.in_channels = int(images.shape[1])
        self.image_size = int(images.shape[2])
        self.class_names = list(class_names)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.num_clients = len(client_indices)
        self._images = images
        self._labels = labels.to(torch.int64)
        sizes = np.fromiter((len(idx) for idx in client_indices), dtype=np.int64, count=self.num_clients)
        if sizes.min() < 1:
            raise ValueError(f"client {int(np.argmin(sizes))} has no samples")
        self._offsets = np.concatenate([[0], np.cumsum(sizes)])
        self._flat = np.concatenate(client_indices).astype(np.int64, copy=False)
        # Every training sample belongs to exactly one client, so the clients' labels are the train set's.
        used = self._labels[torch.from_numpy(self._flat)]
        self._class_counts = torch.bincount(used, minlength=self.num_classes).tolist()
        self._test = (test_images, test_labels.to(torch.int64))
        self._server_pool = np.zeros(0, dtype=np.int64) if server_pool is None else np.asarray(server_pool)
        if np.intersect1d(self._server_pool, self._flat).size:
            raise ValueError("the server pool overlaps the clients' data")
        self._val = np.zeros(0, dtype=np.int64) if val_indices is None else np.asarray(val_indices, dtype=np.int64)
        if np.intersect1d(self._val, self._flat).size:
            raise ValueError("the validation split overlaps the clients' data")
        if np.intersect1d(self._val, self._server_pool).size:
            raise ValueError("the validation split overlaps the server pool")

    def server_pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Labeled training images held back from every client (``data.server_holdout_per_class``)."""
        index = torch.from_numpy(self._server_pool)
        return self._images[index], self._labels[index]

    def val_indices(self) -> np.ndarray:
        """Indices of the validation split in the training array (sorted ascending; empty without one)."""
        return self._val

    def val_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.samples(self._val)

    def client_indices(self, client_id: int) -> np.ndarray:
        """Indices of ``client_id``'s samples in the training array (sorted ascending)."""
        client_id = self._check_client_id(client_id)
        return self._flat[self._offsets[client_id] : self._offsets[client_id + 1]]

    def samples(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels at training-array ``indices`` (as returned by ``client_indices``)."""
        idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return self._images[idx], self._labels[idx]

    def client_size(self, client_id: int) -> int:
        client_id = self._check_client_id(client_id)
        return int(self._offsets[client_id + 1] - self._offsets[client_id])

    def client(self, client_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.samples(self.client_indices(client_id))

    def train_class_counts(self) -> list[int]:
        return list(self._class_counts)

    def client_class_counts(self) -> np.ndarray:
        owner = np.repeat(np.arange(self.num_clients), np.diff(self._offsets))
        labels = self._labels.numpy()[self._flat]
        flat = np.bincount(owner * self.num_classes + labels, minlength=self.num_clients * self.num_classes)
        return flat.reshape(self.num_clients, self.num_classes)

    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._test
