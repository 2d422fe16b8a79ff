"""Loaders of the real datasets as whole in-memory uint8 arrays (balanced, before the long tail)."""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .base import DataError

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist", "~/.cache/mllmfl_dist/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR_DEFAULT_ROOT = "~/.cache/mllmfl_dist/cifar"
# Per-channel mean/std of the training images (the values the CIFAR/FMNIST literature normalises with).
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass(frozen=True)
class LabeledArrays:
    """A whole dataset in memory: images uint8 ``[N, C, H, W]``, labels int64."""

    train_images: torch.Tensor
    train_labels: np.ndarray
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def load_fashion_mnist(root: str) -> LabeledArrays:
    """Read the four raw idx files from ``root``, or when it is empty from the first default folder
    that holds them all. Gzipped (``.gz``) and plain files are both accepted."""
    folders = [Path(root).expanduser()] if root else [Path(d).expanduser() for d in FASHION_MNIST_DIRS]
    found = {folder: [_find_idx_file(folder, name) for name in FASHION_MNIST_FILES] for folder in folders}
    for paths in found.values():
        if all(path is not None for path in paths):
            break
    else:
        # Name what is missing where most of the files are, so one missing file is not reported as all four.
        folder = max(folders, key=lambda f: sum(p is not None for p in found[f]))
        missing = [name for name, path in zip(FASHION_MNIST_FILES, found[folder]) if path is None]
        if len(missing) < len(FASHION_MNIST_FILES):
            files = " and ".join(f"{m}(.gz)" for m in missing)
            raise DataError(
                f"Fashion-MNIST file{'s' if len(missing) > 1 else ''} {files} not found in {folder} "
                f"(the other files are there); restore {'them' if len(missing) > 1 else 'it'} "
                "(`apt-get install --reinstall dataset-fashion-mnist`) or set data.root to a folder "
                "that holds all four"
            )
        raise DataError(
            f"Fashion-MNIST files ({FASHION_MNIST_FILES[0]}.gz and the other three) not found in "
            f"{' or '.join(str(f) for f in folders)}; set data.root (--set data.root=DIR) to their folder, "
            "or install them with `apt-get install dataset-fashion-mnist`"
        )
    train_images, train_labels, test_images, test_labels = (_read_idx(path) for path in paths)
    for images, labels, path in ((train_images, train_labels, paths[0]), (test_images, test_labels, paths[2])):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{path}: images {images.shape} do not match labels {labels.shape}; re-install the files")
    return LabeledArrays(
        train_images=torch.from_numpy(train_images).unsqueeze(1),
        train_labels=train_labels.astype(np.int64),
        test_images=torch.from_numpy(test_images).unsqueeze(1),
        test_labels=torch.from_numpy(test_labels.astype(np.int64)),
        class_names=FASHION_MNIST_CLASSES,
        mean=FASHION_MNIST_STATS[0],
        std=FASHION_MNIST_STATS[1],
    )


def _find_idx_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path) -> np.ndarray:
    """Parse an idx file: 2 zero bytes, type code (0x08 = uint8), ndim, ndim big-endian uint32 sizes, data."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:  # zlib.error: a corrupt deflate stream inside the .gz
        raise DataError(
            f"{path}: cannot read ({type(err).__name__}: {err}); re-install or re-download the file"
        ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not a uint8 idx file; re-install or re-download the file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: expected {int(np.prod(shape))} values, found {data.size}; the file is truncated")
    return data.reshape(shape).copy()  # frombuffer over bytes is read-only; torch wants writable memory


def load_cifar(name: str, root: str, download: bool) -> LabeledArrays:
    """CIFAR-10/100 through torchvision (``name`` is ``cifar10`` or ``cifar100``)."""
    import torchvision  # only CIFAR needs it; keep importing the data package light

    dataset_cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    folder = Path(root or CIFAR_DEFAULT_ROOT).expanduser()
    title = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[name]
    try:
        train = dataset_cls(str(folder), train=True, download=download)
        test = dataset_cls(str(folder), train=False, download=download)
    except RuntimeError:
        # torchvision's "Dataset not found or corrupted" (it checks every batch file's MD5 before unpickling
        # it); only reachable with download off.
        raise DataError(
            f"{title} not found under {folder}, or a file of it is corrupt (torchvision checks each file's MD5); "
            "set data.download = true (or --set data.download=true) to download it again, or data.root to the "
            "folder that holds it"
        ) from None
    except OSError as err:  # urllib's URLError is an OSError: no network, or the folder is not writable
        raise DataError(
            f"could not download {title} to {folder} ({err}); place the extracted dataset under data.root "
            "and set data.download = false"
        ) from None
    return LabeledArrays(
        train_images=_nhwc_to_nchw(train.data),
        train_labels=np.asarray(train.targets, dtype=np.int64),
        test_images=_nhwc_to_nchw(test.data),
        test_labels=torch.as_tensor(test.targets, dtype=torch.int64),
        class_names=tuple(train.classes),
        mean=CIFAR_STATS[name][0],
        std=CIFAR_STATS[name][1],
    )


def _nhwc_to_nchw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))
