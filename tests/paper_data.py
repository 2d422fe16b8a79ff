"""Data files in the real formats of the paper's configs, small, written to a temporary ``data.root``.

- CIFAR-10 / CIFAR-100 as torchvision's python pickles (``cifar-10-batches-py/data_batch_1..5, test_batch,
  batches.meta``; ``cifar-100-python/train, test, meta``), with the MD5 table to point torchvision at
  (:func:`patch_cifar_md5`: only the class attributes ``train_list``, ``test_list`` and ``meta`` change;
  torchvision refuses a file whose MD5 is not the one of the real release);
- an ImageNet-LT tree (JPEGs and the OLTR list files: tests/test_imagenet_lt.py's generator);
- unlabeled web shards for annotation and a labeled alignment pool, as the configs' placeholders name them.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

MD5_ENV = "MLLMFL_TEST_CIFAR_MD5"  # a JSON file of the generated table, read by tests/cifar_md5_main.py

CIFAR_LAYOUT = {
    # torchvision's base_folder, train files, test files, meta file and its key, label key
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        "label_names",
        "labels",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_label_names", "fine_labels"),
}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _dump(path: Path, entry: dict) -> None:
    with path.open("wb") as handle:
        pickle.dump(entry, handle, protocol=2)  # the release's files are python-2 pickles


def write_cifar(root: Path, name: str, train_counts: list[int], test_per_class: int, seed: int = 0) -> dict:
    """Write CIFAR-``name`` (``cifar10`` / ``cifar100``) under ``root`` as torchvision reads it: random
    32x32 RGB images, ``train_counts[c]`` train images of class ``c`` (10 or 100 classes; pass the long-tail
    counts the config keeps, so no image is written for nothing) spread over the release's train files, and
    ``test_per_class`` test images of each. Returns the MD5 table for :func:`patch_cifar_md5`."""
    folder_name, train_files, test_files, meta_file, meta_key, label_key = CIFAR_LAYOUT[name]
    classes = 10 if name == "cifar10" else 100
    folder = root / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def split(files: list[str], counts: list[int]) -> list[list[str]]:
        labels = rng.permutation(np.repeat(np.arange(classes), counts))
        table = []
        for i, chunk in enumerate(np.array_split(labels, len(files))):
            data = rng.integers(0, 256, (len(chunk), 3 * 32 * 32), dtype=np.uint8)  # CHW rows, as the release
            entry = {
                "batch_label": f"batch {i}",
                label_key: [int(c) for c in chunk],
                "data": data,
                "filenames": [f"img_{i}_{j}.png" for j in range(len(chunk))],
            }
            if name == "cifar100":
                entry["coarse_labels"] = [int(c) // 5 for c in chunk]
            _dump(folder / files[i], entry)
            table.append([files[i], _md5(folder / files[i])])
        return table

    if len(train_counts) != classes:
        raise ValueError(f"{name} has {classes} classes, got {len(train_counts)} train counts")
    train = split(train_files, train_counts)
    test = split(test_files, [test_per_class] * classes)
    _dump(folder / meta_file, {meta_key: [f"{name}_class_{c}" for c in range(classes)]})
    return {
        name: {
            "train_list": train,
            "test_list": test,
            "meta": {"filename": meta_file, "key": meta_key, "md5": _md5(folder / meta_file)},
        }
    }


def patch_cifar_md5(table: dict) -> None:
    """Point torchvision's CIFAR10 / CIFAR100 MD5 table (the class attributes ``train_list``, ``test_list``,
    ``meta``) at the generated files' digests; nothing else of torchvision changes."""
    import torchvision

    classes = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}
    for name, entry in table.items():
        for attribute in ("train_list", "test_list", "meta"):
            setattr(classes[name], attribute, entry[attribute])


def write_md5_table(path: Path, *tables: dict) -> Path:
    merged = {k: v for table in tables for k, v in table.items()}
    path.write_text(json.dumps(merged))
    return path


def _image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_web_shard(path: Path, count: int, seed: int = 1) -> Path:
    """An unlabeled web shard of ``count`` random RGB images of varying size and aspect (annotate.shards)."""
    from mllmfl_dist.data.shard_writer import write_shard

    rng = np.random.default_rng(seed)
    samples = ({"key": f"web{i:05d}", "image": _image(rng, 40 + 13 * i, 30 + 7 * (i % 5))} for i in range(count))
    return write_shard(samples, path)


def write_pool_shard(path: Path, labels: list[int], seed: int = 2) -> Path:
    """A labeled alignment-pool shard (align.pool_shards): one random RGB image per entry of ``labels``."""
    from mllmfl_dist.data.shard_writer import write_shard

    rng = np.random.default_rng(seed)
    samples = ({"key": f"pool{i:05d}", "image": _image(rng, 48, 40), "cls": int(c)} for i, c in enumerate(labels))
    return write_shard(samples, path)
