"""Tests of mllmfl_dist.data: long tail, partitioners, augmentation, and the sources."""

from __future__ import annotations

import gzip
from dataclasses import replace as dataclasses_replace
import math
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mllmfl_dist.config import DataConfig, PartitionConfig
from mllmfl_dist.data import (
    ClientData,
    DataError,
    augment_batch,
    build_client_data,
    longtail_counts,
    longtail_indices,
    normalize,
    partition_indices,
)
from mllmfl_dist.data import build as build_module
from mllmfl_dist.data import partition as partition_module
from mllmfl_dist.data.partition import _donations
from mllmfl_dist.core.seeds import TAG_CREFF_SHUFFLE, TAG_LONGTAIL, derive_seed
from mllmfl_dist.data.sources import FASHION_MNIST_DIRS, FASHION_MNIST_FILES, LabeledArrays, load_fashion_mnist

METHODS = ("dirichlet", "creff", "iid")


def balanced_labels(num_classes: int, per_class: int, seed: int = 0) -> np.ndarray:
    """A balanced label array in shuffled order, like a real dataset's."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def longtailed_labels(num_classes: int, per_class: int, imb_factor: float) -> np.ndarray:
    labels = balanced_labels(num_classes, per_class)
    return labels[longtail_indices(labels, num_classes, imb_factor)]


# ---------------------------------------------------------------------------------------- long tail


def test_longtail_counts_match_cifar_lt_literature() -> None:
    assert longtail_counts(5000, 10, 0.01) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert [sum(longtail_counts(5000, 10, f)) for f in (0.01, 0.02, 0.1)] == [12406, 13996, 20431]
    assert [sum(longtail_counts(500, 100, f)) for f in (0.01, 0.02, 0.1)] == [10847, 12608, 19573]
    assert longtail_counts(500, 100, 1.0) == [500] * 100


@pytest.mark.parametrize(
    ("num_classes", "per_class", "imb_factor", "total"),
    [(10, 5000, 0.01, 12406), (10, 5000, 0.02, 13996), (10, 5000, 0.1, 20431), (100, 500, 0.01, 10847),
     (100, 500, 0.02, 12608), (100, 500, 0.1, 19573), (10, 300, 1.0, 3000)],
)  # fmt: skip
def test_longtail_indices_sizes_from_label_arrays(num_classes, per_class, imb_factor, total) -> None:
    labels = balanced_labels(num_classes, per_class)
    kept = longtail_indices(labels, num_classes, imb_factor)
    assert len(kept) == total
    assert np.bincount(labels[kept], minlength=num_classes).tolist() == longtail_counts(
        per_class, num_classes, imb_factor
    )


def test_longtail_indices_without_a_seed_keep_the_first_indices_of_each_class() -> None:
    labels = balanced_labels(10, 100, seed=3)
    counts = longtail_counts(100, 10, 0.05)
    expected = np.sort(np.concatenate([np.flatnonzero(labels == c)[: counts[c]] for c in range(10)]))
    kept = longtail_indices(labels, 10, 0.05)
    assert kept.dtype == np.int64
    np.testing.assert_array_equal(kept, expected)


@pytest.mark.parametrize(
    ("num_classes", "per_class", "imb_factor", "total"),
    [(10, 5000, 0.01, 12406), (100, 500, 0.01, 10847), (10, 300, 0.01, 740)],
)
def test_seeded_longtail_shuffles_each_class_and_keeps_the_exact_counts(
    num_classes, per_class, imb_factor, total
) -> None:
    labels = balanced_labels(num_classes, per_class)
    counts = longtail_counts(per_class, num_classes, imb_factor)
    kept = longtail_indices(labels, num_classes, imb_factor, seed=7)
    assert len(kept) == total and np.bincount(labels[kept], minlength=num_classes).tolist() == counts
    np.testing.assert_array_equal(kept, np.unique(kept))  # sorted, no repeats
    np.testing.assert_array_equal(kept, longtail_indices(labels, num_classes, imb_factor, seed=7))
    assert not np.array_equal(kept, longtail_indices(labels, num_classes, imb_factor, seed=8))
    # A random subset of each tail class, not its first indices (CReFF shuffles before it cuts).
    first = longtail_indices(labels, num_classes, imb_factor)
    assert not np.array_equal(kept, first)
    tail = num_classes - 1
    members = np.flatnonzero(labels == tail)
    chosen = np.intersect1d(kept, members)
    assert chosen.max() > members[counts[tail] - 1]  # reaches past the first count[tail] of the class


# -------------------------------------------------------------------------------------- partitioners


def sizes_of(parts: list[np.ndarray]) -> np.ndarray:
    return np.array([len(p) for p in parts])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("num_clients", [1, 7, 100])
def test_partition_uses_every_index_once(method: str, num_clients: int) -> None:
    labels = longtailed_labels(10, 300, 0.1)
    parts = partition_indices(labels, 10, num_clients, method, 0.5, seed=0)
    assert len(parts) == num_clients
    assert sizes_of(parts).sum() == len(labels)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    assert sizes_of(parts).min() >= 1
    assert all(np.all(np.diff(p) > 0) for p in parts)  # ascending within a client


@pytest.mark.parametrize("method", METHODS)
def test_partition_is_deterministic_by_seed(method: str) -> None:
    labels = longtailed_labels(10, 300, 0.1)
    first = partition_indices(labels, 10, 20, method, 0.5, seed=1)
    again = partition_indices(labels, 10, 20, method, 0.5, seed=1)
    other = partition_indices(labels, 10, 20, method, 0.5, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("method", ["creff", "iid"])
def test_equal_size_partitions_are_equal_within_one(method: str) -> None:
    labels = longtailed_labels(10, 300, 0.05)
    sizes = sizes_of(partition_indices(labels, 10, 37, method, 0.1, seed=0))
    assert sizes.max() - sizes.min() <= 1
    assert sizes.sum() == len(labels)


@pytest.mark.parametrize("method", ["dirichlet", "creff"])
def test_small_alpha_skews_labels_and_iid_does_not(method: str) -> None:
    labels = balanced_labels(10, 500)
    skewed = partition_indices(labels, 10, 50, method, 0.05, seed=0)
    iid = partition_indices(labels, 10, 50, "iid", 0.05, seed=0)

    def mean_top_class_share(parts: list[np.ndarray]) -> float:
        return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))

    assert mean_top_class_share(skewed) > 0.6
    assert mean_top_class_share(iid) < 0.35


def test_dirichlet_fills_empty_clients_on_a_small_long_tailed_set() -> None:
    labels = longtailed_labels(10, 500, 0.01)  # 1243 samples
    parts = partition_indices(labels, 10, 1000, "dirichlet", 0.1, seed=0)
    sizes = sizes_of(parts)
    assert sizes.min() >= 1
    assert sizes.sum() == len(labels)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


def test_dirichlet_with_exactly_as_many_samples_as_clients() -> None:
    labels = longtailed_labels(10, 200, 0.01)
    parts = partition_indices(labels, 10, len(labels), "dirichlet", 0.05, seed=0)
    assert sizes_of(parts).tolist() == [1] * len(labels)


def test_donations_match_moving_one_sample_at_a_time_from_the_largest() -> None:
    rng = np.random.default_rng(0)
    checked = 0
    while checked < 300:
        num_clients = int(rng.integers(2, 40))
        sizes = np.where(rng.random(num_clients) < 0.4, 0, rng.integers(0, 9, size=num_clients))
        wanted = int((sizes == 0).sum())
        if wanted == 0 or sizes.sum() < len(sizes):
            continue
        reference = sizes.copy()
        for _ in range(wanted):
            reference[np.argmax(reference)] -= 1  # argmax: lowest id among ties
        np.testing.assert_array_equal(sizes - _donations(sizes, wanted), reference)
        checked += 1


@pytest.mark.parametrize("method", METHODS)
def test_fewer_samples_than_clients_is_a_data_error(method: str) -> None:
    with pytest.raises(DataError, match="federated.num_clients"):
        partition_indices(np.arange(10) % 2, 2, 11, method, 0.5, seed=0)


def test_labels_outside_the_classes_are_rejected() -> None:
    with pytest.raises(ValueError, match="labels"):
        partition_indices(np.array([0, 1, 2, 3]), 3, 2, "dirichlet", 0.5, seed=0)


def test_dirichlet_with_100k_clients_is_fast() -> None:
    labels = balanced_labels(10, 12_000)
    start = time.perf_counter()
    parts = partition_indices(labels, 10, 100_000, "dirichlet", 0.5, seed=0)
    elapsed = time.perf_counter() - start
    assert len(parts) == 100_000
    assert sizes_of(parts).min() >= 1
    assert sizes_of(parts).sum() == len(labels)
    assert elapsed < 5.0, f"took {elapsed:.1f} s"


def creff_reference(
    labels: np.ndarray, num_classes: int, num_clients: int, seed: int, cuts: list[np.ndarray]
) -> list[list[int]]:
    """CReFF's partition written out literally with Python lists, given the same shuffle and the per-group
    class cuts (``cuts[k][c, j]``: how many samples of class c worker j of group k got) that were drawn."""
    total = len(labels)
    shuffled = np.random.default_rng([seed, TAG_CREFF_SHUFFLE]).permutation(total)
    pairs = [(int(i), int(labels[i])) for i in shuffled]
    num_splits = math.ceil(num_clients / 10)
    group_sizes = [10] * (num_splits - 1) + [num_clients - 10 * (num_splits - 1)]
    assert len(cuts) == num_splits
    workers: list[list[int]] = []
    start = 0
    for k, workers_in_group in enumerate(group_sizes):
        stop = total if k == num_splits - 1 else start + int(workers_in_group * total // num_clients)
        chunk, start = pairs[start:stop], stop
        lists: list[list[int]] = [[] for _ in range(workers_in_group)]
        for c in range(num_classes):
            idx_class = np.array([i for i, y in chunk if y == c], dtype=np.int64)
            assert cuts[k][c].sum() == len(idx_class)
            for j, piece in enumerate(np.split(idx_class, np.cumsum(cuts[k][c])[:-1])):
                lists[j] += piece.tolist()
        workers += lists
    concatenated = [i for worker in workers for i in worker]
    # partition_balance: equal consecutive pieces, the first total % num_clients one larger.
    per_part, extra = divmod(total, num_clients)
    pieces, i = [], 0
    for client in range(num_clients):
        size = per_part + (client < extra)
        pieces.append(sorted(concatenated[i : i + size]))
        i += size
    return pieces


@pytest.mark.parametrize("num_clients", [1, 7, 10, 20, 23])
def test_creff_matches_a_literal_reference(num_clients: int, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = longtailed_labels(10, 300, 0.1)
    drawn: list[np.ndarray] = []
    real = partition_module._dirichlet_groups

    def recording(counts, workers, alpha, rng):  # type: ignore[no-untyped-def]
        cut = real(counts, workers, alpha, rng)
        drawn.extend(cut)
        return cut

    monkeypatch.setattr(partition_module, "_dirichlet_groups", recording)
    parts = partition_indices(labels, 10, num_clients, "creff", 0.5, seed=3)
    expected = creff_reference(labels, 10, num_clients, 3, drawn)
    assert [p.tolist() for p in parts] == expected


@pytest.mark.parametrize(("workers", "alpha"), [(10, 0.5), (10, 0.1), (3, 1.0), (1, 0.5)])
def test_creff_group_split_follows_feddf(workers: int, alpha: float) -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 60, size=(40, 10))
    if alpha >= 0.5:
        counts[:5, 3:] = 0  # some groups with only a few classes (too few for a small alpha to pass)
    cut = partition_module._dirichlet_groups(counts, workers, alpha, np.random.default_rng(1))
    assert cut.shape == (40, 10, workers)
    assert cut.min() >= 0
    np.testing.assert_array_equal(cut.sum(axis=2), counts)  # every sample of a class goes to a worker
    chunk = counts.sum(axis=1)
    # FedDF's minimum: the smallest worker holds at least half its share.
    assert np.all(cut.sum(axis=1).min(axis=1) >= chunk // (2 * workers))
    # A worker already holding >= chunk / workers samples gets nothing of the later classes.
    sizes = np.zeros((40, workers), dtype=np.int64)
    for c in range(10):
        full = sizes * workers >= chunk[:, None]
        assert np.all(cut[:, c][full] == 0)
        sizes += cut[:, c]


def test_creff_small_alpha_concentrates_classes_and_large_alpha_spreads_them() -> None:
    labels = balanced_labels(10, 500)

    def mean_top_class_share(alpha: float) -> float:
        shares = [
            np.bincount(labels[p], minlength=10).max() / len(p)
            for seed in range(5)
            for p in partition_indices(labels, 10, 20, "creff", alpha, seed=seed)
        ]
        return float(np.mean(shares))

    assert mean_top_class_share(0.1) > 0.5
    assert mean_top_class_share(100.0) < 0.25


def test_creff_with_20_clients_is_equal_within_one_and_uses_every_index_once() -> None:
    labels = longtailed_labels(10, 5000, 0.01)  # 12406 samples, CIFAR-10-LT at IF 100
    parts = partition_indices(labels, 10, 20, "creff", 0.5, seed=0)
    sizes = sizes_of(parts)
    assert len(parts) == 20
    assert sizes.max() - sizes.min() <= 1
    assert sorted(sizes.tolist()) == [620] * 14 + [621] * 6
    assert sizes[:6].tolist() == [621] * 6  # the first total % N pieces take one more
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)


def test_creff_unreachable_minimum_size_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partition_module, "_CREFF_ATTEMPTS", 50)  # the real limit only takes longer
    # Two classes and a tiny alpha: each class lands on about one worker of ten, so the rest stay empty.
    with pytest.raises(DataError, match=r"partition\.alpha.*federated\.num_clients"):
        partition_indices(np.arange(200) % 2, 2, 20, "creff", 0.001, seed=0)


def test_creff_with_100k_clients_is_fast() -> None:
    labels = balanced_labels(10, 12_000)
    start = time.perf_counter()
    parts = partition_indices(labels, 10, 100_000, "creff", 0.5, seed=0)
    elapsed = time.perf_counter() - start
    sizes = sizes_of(parts)
    assert len(parts) == 100_000
    assert sizes.min() == 1 and sizes.max() == 2
    assert sizes.sum() == len(labels)
    assert elapsed < 5.0, f"took {elapsed:.1f} s"


# -------------------------------------------------------------------------------------- augmentation


def random_images(batch: int, channels: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    # Values 1..255: no pixel is 0, so zero padding is always distinguishable from image content.
    return torch.randint(1, 256, (batch, channels, size, size), generator=torch.Generator().manual_seed(seed)).to(
        torch.uint8
    )


def shifted(image: torch.Tensor, pad: int, dy: int, dx: int) -> torch.Tensor:
    """Slow reference crop: zero-pad by ``pad`` and take the window at offset (dy, dx)."""
    channels, height, width = image.shape
    padded = torch.zeros(channels, height + 2 * pad, width + 2 * pad, dtype=image.dtype)
    padded[:, pad : pad + height, pad : pad + width] = image
    return padded[:, dy : dy + height, dx : dx + width]


def matching_offsets(original: torch.Tensor, cropped: torch.Tensor, pad: int) -> list[tuple[int, int]]:
    return [
        (dy, dx)
        for dy in range(2 * pad + 1)
        for dx in range(2 * pad + 1)
        if torch.equal(shifted(original, pad, dy, dx), cropped)
    ]


def test_crop_without_padding_or_flip_is_identity() -> None:
    images = random_images(16)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(augment_batch(images, generator, crop_padding=0, hflip=False), images)
    assert torch.equal(augment_batch(images, generator, crop_padding=4, hflip=False, random_crop=False), images)


def test_crop_equals_a_zero_padded_shift_of_each_sample() -> None:
    pad = 2
    images = random_images(200)
    out = augment_batch(images, torch.Generator().manual_seed(1), crop_padding=pad, hflip=False)
    assert out.shape == images.shape and out.dtype == torch.uint8
    offsets = []
    for original, cropped in zip(images, out):
        found = matching_offsets(original, cropped, pad)
        assert len(found) == 1, "each output must be exactly one shifted window of its own input"
        offsets.append(found[0])
    # Every one of the 25 offsets, the extremes included, shows up in 200 samples.
    assert set(offsets) == {(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)}


def test_flip_flips_about_half_the_samples() -> None:
    images = random_images(1000)
    out = augment_batch(images, torch.Generator().manual_seed(2), crop_padding=4, hflip=True, random_crop=False)
    same = (out == images).flatten(1).all(1)
    flipped = (out == images.flip(-1)).flatten(1).all(1)
    assert bool((same ^ flipped).all()), "each sample is either unchanged or mirrored"
    assert 400 < int(flipped.sum()) < 600


def test_crop_and_flip_together() -> None:
    pad = 1
    images = random_images(100)
    out = augment_batch(images, torch.Generator().manual_seed(3), crop_padding=pad, hflip=True)
    for original, augmented in zip(images, out):
        plain = matching_offsets(original, augmented, pad)
        mirrored = matching_offsets(original, augmented.flip(-1), pad)
        assert len(plain) + len(mirrored) == 1


def test_augmentation_depends_only_on_the_generator() -> None:
    images = random_images(64)
    first = augment_batch(images, torch.Generator().manual_seed(7), 4, True)
    again = augment_batch(images, torch.Generator().manual_seed(7), 4, True)
    other = augment_batch(images, torch.Generator().manual_seed(8), 4, True)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_normalize_per_channel() -> None:
    images = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = normalize(images, (0.5, 0.5, 0.2), (0.5, 0.25, 0.1))
    assert out.dtype == torch.float32
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([-1.0, 2.0, 0.0]), atol=1e-6)
    with pytest.raises(ValueError):
        normalize(images, (0.5,), (0.5,))


# ------------------------------------------------------------------------------------- fashion-mnist


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fake_fashion_mnist(folder: Path, train: int = 40, test: int = 20) -> None:
    rng = np.random.default_rng(0)
    for name, count in zip(FASHION_MNIST_FILES, (train, train, test, test)):
        if "images" in name:
            write_idx(folder / f"{name}.gz", rng.integers(0, 256, (count, 28, 28)))
        else:
            write_idx(folder / f"{name}.gz", np.arange(count) % 10)


def test_fashion_mnist_idx_parsing_on_written_files(tmp_path: Path) -> None:
    write_fake_fashion_mnist(tmp_path)
    arrays = load_fashion_mnist(str(tmp_path))
    assert arrays.train_images.shape == (40, 1, 28, 28) and arrays.train_images.dtype == torch.uint8
    assert arrays.train_labels.tolist() == [i % 10 for i in range(40)]
    assert arrays.test_images.shape == (20, 1, 28, 28)


def test_fashion_mnist_corrupt_file_is_a_data_error(tmp_path: Path) -> None:
    write_fake_fashion_mnist(tmp_path)
    with gzip.open(tmp_path / f"{FASHION_MNIST_FILES[1]}.gz", "wb") as f:
        f.write(b"not an idx file")
    with pytest.raises(DataError, match="idx"):
        load_fashion_mnist(str(tmp_path))


def test_fashion_mnist_missing_is_a_data_error(tmp_path: Path) -> None:
    config = DataConfig(source="fashion_mnist", root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as err:
        build_client_data(config, PartitionConfig(), 4, seed=0)
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message
    assert "data.root" in message and "apt-get install dataset-fashion-mnist" in message
    assert "\n" not in message


FASHION_PRESENT = all((Path(FASHION_MNIST_DIRS[0]) / f"{name}.gz").is_file() for name in FASHION_MNIST_FILES)


@pytest.fixture(scope="module")
def fashion_mnist() -> LabeledArrays:
    if not FASHION_PRESENT:
        pytest.skip(f"Fashion-MNIST not installed in {FASHION_MNIST_DIRS[0]} (apt-get install dataset-fashion-mnist)")
    return load_fashion_mnist("")


def test_fashion_mnist_real_files(fashion_mnist: LabeledArrays, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = fashion_mnist
    assert raw.train_images.shape == (60000, 1, 28, 28) and len(raw.train_labels) == 60000
    assert raw.test_images.shape == (10000, 1, 28, 28)
    assert np.bincount(raw.train_labels).tolist() == [6000] * 10

    # Reuse the arrays loaded above: decompressing the files again would double the test's time.
    monkeypatch.setattr(build_module, "load_fashion_mnist", lambda root: raw)
    data = build_client_data(DataConfig(source="fashion_mnist", imb_factor=0.01), PartitionConfig(), 20, seed=0)
    expected = longtail_counts(6000, 10, 0.01)
    assert expected[:2] == [6000, 3596]
    assert data.train_class_counts() == expected
    assert sum(data.client_size(c) for c in range(20)) == sum(expected)
    images, labels = data.client(0)
    assert images.dtype == torch.uint8 and images.shape[1:] == (1, 28, 28) and labels.dtype == torch.int64
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 28)
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"
    test_images, test_labels = data.test_set()
    assert test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(test_labels).tolist() == [1000] * 10


# -------------------------------------------------------------------------------------------- cifar


@pytest.mark.parametrize("source", ["cifar10", "cifar100"])
def test_cifar_without_download_is_a_data_error(tmp_path: Path, source: str) -> None:
    config = DataConfig(source=source, root=str(tmp_path), download=False)
    with pytest.raises(DataError) as err:
        build_client_data(config, PartitionConfig(), 4, seed=0)
    message = str(err.value)
    assert str(tmp_path) in message and "data.download" in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------- synthetic


def on_demand(num_clients: int, method: str = "dirichlet", **data: object) -> ClientData:
    config = DataConfig(source="synthetic", synthetic_mode="on_demand", **data)
    return build_client_data(config, PartitionConfig(method=method, alpha=0.5), num_clients, seed=0)


def test_on_demand_client_is_reproducible_and_clients_differ() -> None:
    data = on_demand(10)
    images, labels = data.client(3)
    assert images.shape == (64, 3, 16, 16) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    again_images, again_labels = on_demand(10).client(3)  # a fresh object, as on another process
    assert torch.equal(images, again_images) and torch.equal(labels, again_labels)
    assert not torch.equal(images, data.client(4)[0])


def test_on_demand_100k_clients_cost_nothing_up_front() -> None:
    start = time.perf_counter()
    data = on_demand(100_000)
    assert time.perf_counter() - start < 0.5
    assert data.num_clients == 100_000 and data.client_size(99_999) == 64
    assert data.client(99_999)[0].shape == (64, 3, 16, 16)
    with pytest.raises(IndexError):
        data.client(100_000)


def test_on_demand_labels_follow_the_long_tail() -> None:
    data = on_demand(200, method="iid", imb_factor=0.1)
    labels = torch.cat([data.client(c)[1] for c in range(200)])
    prior = np.array(longtail_counts(200, 10, 0.1), dtype=float)
    prior /= prior.sum()
    share = np.bincount(labels.numpy(), minlength=10) / len(labels)
    np.testing.assert_allclose(share, prior, atol=0.02)
    assert data.train_class_counts() == [round(200 * 64 * p) for p in prior]
    assert torch.bincount(data.test_set()[1]).tolist() == [50] * 10


def test_on_demand_dirichlet_clients_are_skewed() -> None:
    data = build_client_data(
        DataConfig(synthetic_mode="on_demand", imb_factor=1.0),
        PartitionConfig(method="dirichlet", alpha=0.05),
        50,
        seed=0,
    )
    top_share = [torch.bincount(data.client(c)[1], minlength=10).max().item() / 64 for c in range(50)]
    assert np.mean(top_share) > 0.6


def test_synthetic_array_partitions_cover_the_long_tailed_set() -> None:
    config = DataConfig(source="synthetic", synthetic_mode="array", samples_per_class=200, imb_factor=0.01)
    data = build_client_data(config, PartitionConfig(method="dirichlet", alpha=0.3), 20, seed=0)
    expected = longtail_counts(200, 10, 0.01)
    assert data.train_class_counts() == expected
    all_indices = np.concatenate([data.client_indices(c) for c in range(20)])
    labels = np.tile(np.arange(10), 200)  # the synthetic array interleaves classes
    chosen = longtail_indices(labels, 10, 0.01, seed=derive_seed(0, TAG_LONGTAIL))  # the run's seed
    np.testing.assert_array_equal(np.sort(all_indices), chosen)
    all_labels = torch.cat([data.client(c)[1] for c in range(20)])
    assert torch.bincount(all_labels, minlength=10).tolist() == expected

    again = build_client_data(config, PartitionConfig(method="dirichlet", alpha=0.3), 20, seed=0)
    assert all(torch.equal(data.client(c)[0], again.client(c)[0]) for c in range(20))


def test_synthetic_array_is_learnable_by_class_means() -> None:
    config = DataConfig(source="synthetic", samples_per_class=100, imb_factor=0.1, channels=1)
    data = build_client_data(config, PartitionConfig(method="iid"), 5, seed=0)
    images = torch.cat([data.client(c)[0] for c in range(5)]).float().flatten(1)
    labels = torch.cat([data.client(c)[1] for c in range(5)])
    means = torch.stack([images[labels == c].mean(0) for c in range(10)])
    test_images, test_labels = data.test_set()
    predicted = torch.cdist(test_images.float().flatten(1), means).argmin(1)
    assert (predicted == test_labels).float().mean().item() > 0.9


def test_train_indices_restrict_the_clients_and_the_holdout_to_a_slice_of_the_split() -> None:
    config = DataConfig(
        source="synthetic", samples_per_class=200, imb_factor=0.1, server_holdout_per_class=3, train_indices="0:1500"
    )
    data = build_client_data(config, PartitionConfig(), 10, seed=0)
    used = np.concatenate([data.client_indices(c) for c in range(10)])
    assert used.max() < 1500 and data._server_pool.max() < 1500
    assert np.intersect1d(used, data._server_pool).size == 0
    with pytest.raises(DataError, match="data.train_indices"):
        build_client_data(dataclasses_replace(config, train_indices="0:5000"), PartitionConfig(), 10, seed=0)


def test_an_imbalance_factor_that_empties_a_class_is_refused() -> None:
    config = DataConfig(source="synthetic", samples_per_class=50, imb_factor=0.01)  # int(50 * 0.01^(8/9)) = 0
    with pytest.raises(DataError, match=r"data.imb_factor = 0.01 leaves class\(es\) \[8, 9\]"):
        build_client_data(config, PartitionConfig(), 5, seed=0)
