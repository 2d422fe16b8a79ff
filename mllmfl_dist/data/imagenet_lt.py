"""ImageNet-LT (Liu et al., "Large-Scale Long-Tailed Recognition in an Open World", CVPR 2019 / OLTR).

The split is defined by two list files, ``ImageNet_LT_train.txt`` (115,846 images of 1000 classes, 1280 .. 5
per class: the long tail is already in the list) and ``ImageNet_LT_test.txt`` (50 per class, taken from the
ILSVRC-2012 validation set). Each line is ``relative/path.JPEG label``, relative to the ImageNet root, e.g.
``train/n01440764/n01440764_10026.JPEG 0`` (the test list needs ``val/`` sorted into synset folders).

Every image is decoded once with PIL (RGB), its shorter side resized to ``image_size`` and centre-cropped to
``image_size x image_size``, and the split is cached as uint8 ``[N, 3, S, S]`` ``.npy`` files under
``<root>/.mllmfl_cache/`` (or, when the root is read-only, ``~/.cache/mllmfl_dist/imagenet_lt/<hash>/``):

- ``imagenet_lt_<split>_<size>.npy`` (images), ``..._labels.npy`` and ``....json`` (the list's path, SHA-256
  and the shape: the json is written last and marks the entry complete);
- an entry is reused when it is complete, newer than its list file and made from a list with the same
  digest; otherwise it is rebuilt. Files are written under a temporary name and moved into place with
  ``os.replace``, so a crash never leaves a half-written entry that looks valid.
- Ranks building at once serialise on a ``flock`` of ``<entry>.lock`` (never on ``LOCAL_RANK``: every node
  has a local rank 0, and nodes may share the folder): the first decodes, the others wait and then read its
  cache (where the file system refuses locks they each decode into temporary files named by host and
  process; the result is the same).

Cached arrays are opened as copy-on-write memory maps, so the ranks of one node share one copy of the images
in the page cache (4.4 GB for the train list at 112 px; 17 GB at 224 px).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..core.checkpoint import output_errors
from ..core.locks import exclusive, unique_suffix
from .base import DataError
from .images import CorruptImageError, ImageBounds, UnusableImageError, decode_image, fit_square
from .sources import LabeledArrays

log = logging.getLogger(__name__)

LIST_FILES = {"train": "ImageNet_LT_train.txt", "test": "ImageNet_LT_test.txt"}
# Optional, in the root or lists_dir: "n01440764 tench, Tinca tinca" per line (the Kaggle ILSVRC release's file)
SYNSET_MAPPING = "LOC_synset_mapping.txt"
CACHE_DIRNAME = ".mllmfl_cache"
FALLBACK_CACHE = "~/.cache/mllmfl_dist/imagenet_lt"
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DECODE_THREADS = min(16, os.cpu_count() or 1)  # PIL releases the GIL while decoding and resizing


def load_imagenet_lt(root: str, lists_dir: str, image_size: int, bounds: ImageBounds | None = None) -> LabeledArrays:
    """ImageNet-LT train and test splits as uint8 ``[N, 3, S, S]`` arrays (``S = image_size``).

    ``lists_dir`` holds the two list files; empty means ``root``. The train split is returned as listed:
    it is long-tailed already, so no further long tail applies. Class ``c`` is named by the synset folder
    of its first train image, or by that synset's first English name where ``LOC_synset_mapping.txt`` is in
    ``lists_dir`` or ``root`` (the names a text-scoring teacher such as align.teacher = "llava" reads).
    An image over ``bounds`` (``data.max_image_*``, checked before decoding) is a :class:`DataError` naming it.
    """
    if not root:
        raise DataError("data.root is empty; set it to the ImageNet root (the folder holding train/ and val/)")
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DataError(
            f"ImageNet root {root_path} does not exist; set data.root to the folder holding train/ and val/"
        )
    lists_path = Path(lists_dir).expanduser() if lists_dir else root_path
    entries = {split: _read_list(lists_path / name, lists_dir) for split, name in LIST_FILES.items()}

    train_labels = entries["train"][1]
    num_classes = int(train_labels.max()) + 1
    empty = np.flatnonzero(np.bincount(train_labels, minlength=num_classes) == 0)
    if len(empty):
        # A stray large label would otherwise make a model with that many classes, most of them empty.
        at = entries["train"][2][int(np.argmax(train_labels))]
        raise DataError(
            f"{lists_path / LIST_FILES['train']}: labels go up to {num_classes - 1} (line {at}) but "
            f"{len(empty)} classes below that have no image (first: {int(empty[0])}); number the "
            "classes 0..C-1"
        )
    _, test_labels, test_lines = entries["test"]
    if test_labels.max() >= num_classes:
        bad = int(np.argmax(test_labels >= num_classes))
        raise DataError(
            f"{lists_path / LIST_FILES['test']} line {test_lines[bad]}: label {int(test_labels[bad])} "
            f"is out of range; the train list has labels 0..{num_classes - 1}"
        )
    class_names = _class_names(entries["train"][0], train_labels, num_classes)
    class_names = _readable_names(class_names, [lists_path / SYNSET_MAPPING, root_path / SYNSET_MAPPING])

    images = {
        split: _cached_split(root_path, split, lists_path / LIST_FILES[split], *entries[split], image_size, bounds)
        for split in LIST_FILES
    }
    return LabeledArrays(
        train_images=images["train"],
        train_labels=train_labels,
        test_images=images["test"],
        test_labels=torch.from_numpy(test_labels),
        class_names=class_names,
        mean=IMAGENET_STATS[0],
        std=IMAGENET_STATS[1],
    )


def _read_list(path: Path, lists_dir: str) -> tuple[list[str], np.ndarray, list[int]]:
    """``(relative paths, int64 labels, line numbers)`` of a list file; labels must be integers >= 0."""
    if not path.is_file():
        where = repr(lists_dir) if lists_dir else "'' (= data.root)"
        raise DataError(
            f"ImageNet-LT list file {path} not found; put {LIST_FILES['train']} and "
            f"{LIST_FILES['test']} in data.lists_dir (now {where})"
        )
    paths: list[str] = []
    labels: list[int] = []
    lines: list[int] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"ImageNet-LT list file {path} is not UTF-8 text ({err.reason} at byte {err.start}); "
            "replace it with the OLTR list"
        ) from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(None, 1)
        try:
            label = int(parts[1]) if len(parts) == 2 else -1
        except ValueError:
            label = -1
        if label < 0:
            raise DataError(
                f"{path} line {number}: expected 'relative/path.JPEG label' with a label >= 0, got {line.strip()!r}"
            )
        if Path(parts[0]).is_absolute() or ".." in Path(parts[0]).parts:
            raise DataError(
                f"{path} line {number}: {parts[0]!r} is not a path inside data.root (absolute or with "
                "'..'); list images relative to the ImageNet root"
            )
        paths.append(parts[0])
        labels.append(label)
        lines.append(number)
    if not paths:
        raise DataError(f"ImageNet-LT list file {path} is empty")
    return paths, np.asarray(labels, dtype=np.int64), lines


def _class_names(paths: list[str], labels: np.ndarray, num_classes: int) -> tuple[str, ...]:
    names = [f"class_{c}" for c in range(num_classes)]
    # The first occurrence of each label: np.unique returns the first index of each value.
    classes, first = np.unique(labels, return_index=True)
    for c, i in zip(classes.tolist(), first.tolist()):
        names[c] = Path(paths[i]).parent.name or names[c]
    return tuple(names)


def _readable_names(synsets: tuple[str, ...], candidates: list[Path]) -> tuple[str, ...]:
    """Synset ids -> the first English name of each, from the first mapping file found (ids kept otherwise)."""
    for path in candidates:
        if path.is_file():
            mapping = {}
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                log.warning("ImageNet-LT: cannot read %s (%s); classes keep their synset ids", path, err)
                return synsets
            for line in text.splitlines():
                synset, _, names = line.strip().partition(" ")
                if names:
                    mapping[synset] = names.split(",")[0].strip()
            log.info("ImageNet-LT: class names from %s", path)
            return tuple(mapping.get(s, s) for s in synsets)
    return synsets


def _list_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cache_dirs(root: Path) -> list[Path]:
    """Where a cache may live: ``<root>/.mllmfl_cache``, then a per-root folder in the user's cache."""
    fallback = Path(FALLBACK_CACHE).expanduser() / hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return [root / CACHE_DIRNAME, fallback]


def _entry_paths(folder: Path, split: str, size: int) -> tuple[Path, Path, Path]:
    stem = f"imagenet_lt_{split}_{size}"
    return folder / f"{stem}.npy", folder / f"{stem}_labels.npy", folder / f"{stem}.json"


def _load_entry(
    folder: Path, split: str, size: int, list_file: Path, digest: str, labels: np.ndarray
) -> torch.Tensor | None:
    """The cached images of ``split`` in ``folder`` if the entry is complete and current, else None."""
    images_path, labels_path, meta_path = _entry_paths(folder, split, size)
    try:
        if min(p.stat().st_mtime for p in (images_path, labels_path, meta_path)) < list_file.stat().st_mtime:
            return None
        meta = json.loads(meta_path.read_text())
        if meta.get("list_sha256") != digest or meta.get("shape") != [len(labels), 3, size, size]:
            return None
        if not np.array_equal(np.load(labels_path), labels):
            return None
        images = np.load(images_path, mmap_mode="c")  # copy-on-write: writable, pages shared until written
    except (OSError, ValueError):
        return None
    if images.dtype != np.uint8 or list(images.shape) != meta["shape"]:
        return None
    return torch.from_numpy(images)


def _cached_split(
    root: Path,
    split: str,
    list_file: Path,
    paths: list[str],
    labels: np.ndarray,
    lines: list[int],
    size: int,
    bounds: ImageBounds | None = None,
) -> torch.Tensor:
    digest = _list_digest(list_file)
    folders = _cache_dirs(root)
    for folder in folders:
        cached = _load_entry(folder, split, size, list_file, digest, labels)
        if cached is not None:
            log.info("ImageNet-LT %s: %d images from the cache %s", split, len(labels), folder)
            return cached
    folder = _writable(folders)
    with exclusive(_entry_paths(folder, split, size)[0].with_suffix(".lock")):
        cached = _load_entry(folder, split, size, list_file, digest, labels)  # another rank may have built it
        if cached is None:
            # Under the lock no other build of this entry runs: temporary files of it belong to killed builds
            # (gigabytes each for the train split).
            for entry_file in _entry_paths(folder, split, size):
                for stale in folder.glob(entry_file.name + ".tmp*"):
                    if stale.name[len(entry_file.name) + 4 :].isdigit():
                        stale.unlink(missing_ok=True)
            with output_errors(folder):
                _build_entry(folder, root, split, list_file, digest, paths, labels, lines, size, bounds)
            cached = _load_entry(folder, split, size, list_file, digest, labels)
    if cached is None:
        raise DataError(
            f"the ImageNet-LT cache in {folder} could not be read back after writing it; delete the "
            f"folder and run again"
        )
    return cached


def _writable(folders: list[Path]) -> Path:
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            if folder != folders[0]:
                log.warning("ImageNet-LT: %s is not writable; caching the decoded images in %s", folders[0], folder)
            return folder
    raise DataError(
        f"no writable folder for the ImageNet-LT cache (tried {', '.join(str(f) for f in folders)}); "
        "make data.root writable"
    )


def _build_entry(
    folder: Path,
    root: Path,
    split: str,
    list_file: Path,
    digest: str,
    paths: list[str],
    labels: np.ndarray,
    lines: list[int],
    size: int,
    bounds: ImageBounds | None = None,
) -> None:
    from tqdm import tqdm

    files = [root / p for p in paths]
    for file, line in zip(files, lines):
        if not file.is_file():
            raise DataError(
                f"{file} (listed in {list_file} line {line}) does not exist; check data.root "
                f"({root}) and the ImageNet folders"
            )
    images_path, labels_path, meta_path = _entry_paths(folder, split, size)
    suffix = unique_suffix()
    tmp = [p.with_name(p.name + suffix) for p in (images_path, labels_path, meta_path)]
    log.info("ImageNet-LT %s: decoding %d images to %d px into %s (once)", split, len(files), size, folder)
    try:
        out = np.lib.format.open_memmap(tmp[0], mode="w+", dtype=np.uint8, shape=(len(files), 3, size, size))
        with ThreadPoolExecutor(DECODE_THREADS) as pool:
            decoded = pool.map(lambda file: _decode(file, size, bounds), files)
            for i, image in enumerate(
                tqdm(decoded, total=len(files), desc=f"ImageNet-LT {split} {size}px", unit="img", mininterval=2.0)
            ):
                out[i] = image
        out.flush()
        del out
        with open(tmp[1], "wb") as f:
            np.save(f, labels)
        tmp[2].write_text(
            json.dumps({"list_file": str(list_file), "list_sha256": digest, "shape": [len(files), 3, size, size]})
        )
        # "Newer than the list" by construction, even when the list's mtime is ahead of this clock (NFS skew).
        stamp = max(time.time(), list_file.stat().st_mtime)
        for path in tmp:
            os.utime(path, (stamp, stamp))
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # on disk before the json (moved last) says the entry is complete
            finally:
                os.close(fd)
        # The json marks the entry complete, so it is moved last.
        for src, dst in zip(tmp, (images_path, labels_path, meta_path)):
            os.replace(src, dst)
    finally:
        for path in tmp:
            path.unlink(missing_ok=True)


def _decode(path: Path, size: int, bounds: ImageBounds | None = None) -> np.ndarray:
    """One image as uint8 ``[3, size, size]``: RGB, shorter side resized to ``size``, centre crop; JPEGs are
    decoded at the smallest DCT scale (1/2^k) that is still at least size x size (:func:`decode_image`)."""
    try:
        img = decode_image(path, bounds, side=size)
        array = np.asarray(fit_square(img.convert("RGB"), size), dtype=np.uint8)
    except CorruptImageError as err:
        detail = str(err).removeprefix("cannot decode image ")
        raise DataError(f"{path}: cannot decode the image {detail}; replace the file") from None
    except UnusableImageError as err:
        raise DataError(f"{path}: {err}; replace the file") from None
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, struct.error... while resizing too
        raise DataError(f"{path}: cannot decode the image ({type(err).__name__}: {err}); replace the file") from None
    return array.transpose(2, 0, 1)
