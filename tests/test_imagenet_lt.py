"""ImageNet-LT source: OLTR list files over an ImageNet root, decoded once into a uint8 .npy cache."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mllmfl_dist.config import DataConfig, PartitionConfig
from mllmfl_dist.data import DataError, build_client_data
from mllmfl_dist.data import imagenet_lt as imagenet_lt_module
from mllmfl_dist.data.imagenet_lt import load_imagenet_lt

SYNSETS = ("n01440764", "n01443537", "n01484850")
TRAIN_COUNTS = (6, 3, 1)  # long-tailed, as in the real train list
TEST_PER_CLASS = 2
SIZE = 12


def _jpeg(path: Path, rng: np.random.Generator, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, "JPEG")


def write_imagenet_lt_tree(
    root: Path, synsets=SYNSETS, train_counts=TRAIN_COUNTS, test_per_class: int = TEST_PER_CLASS, seed: int = 0
) -> Path:
    """An ImageNet root with small random JPEGs of varying aspect in train/<synset>/ and val/<synset>/, and
    the two OLTR list files (ImageNet_LT_train.txt, ImageNet_LT_test.txt) in it; returns ``root``."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label, (synset, count) in enumerate(zip(synsets, train_counts)):
        for i in range(count):
            rel = f"train/{synset}/{synset}_{i}.JPEG"
            _jpeg(root / rel, rng, 20 + 3 * i, 16 + i)
            train.append(f"{rel} {label}")
        for i in range(test_per_class):
            rel = f"val/{synset}/ILSVRC2012_val_{label}{i:07d}.JPEG"
            _jpeg(root / rel, rng, 14, 22)
            test.append(f"{rel} {label}")
    (root / "ImageNet_LT_train.txt").write_text("\n".join(train) + "\n")
    (root / "ImageNet_LT_test.txt").write_text("\n".join(test) + "\n")
    return root


@pytest.fixture
def fake_imagenet(tmp_path: Path) -> Path:
    """An ImageNet root with tiny random JPEGs of varying aspect in train/<synset>/ and val/<synset>/,
    and the two list files in it."""
    return write_imagenet_lt_tree(tmp_path / "imagenet")


def _data(root: Path, lists_dir: str = "", imb_factor: float = 1.0) -> DataConfig:
    return DataConfig(source="imagenet_lt", root=str(root), lists_dir=lists_dir, image_size=SIZE, imb_factor=imb_factor)


def test_build_client_data_reads_the_lists_and_partitions(fake_imagenet: Path) -> None:
    # imb_factor < 1 is ignored: the train list is long-tailed already.
    partition = PartitionConfig("dirichlet", 0.5)
    data = build_client_data(_data(fake_imagenet, imb_factor=0.01), partition, 2, 0)
    assert data.num_classes == 3 and data.num_clients == 2
    assert data.train_class_counts() == list(TRAIN_COUNTS)
    assert data.class_names == list(SYNSETS)
    assert (data.in_channels, data.image_size) == (3, SIZE)
    assert data.mean == (0.485, 0.456, 0.406) and data.std == (0.229, 0.224, 0.225)
    sizes = [data.client_size(c) for c in range(2)]
    assert min(sizes) >= 1 and sum(sizes) == sum(TRAIN_COUNTS)
    images, labels = data.client(0)
    assert images.dtype == torch.uint8 and tuple(images.shape) == (sizes[0], 3, SIZE, SIZE)
    assert labels.dtype == torch.int64
    test_images, test_labels = data.test_set()
    assert test_images.dtype == torch.uint8 and tuple(test_images.shape) == (3 * TEST_PER_CLASS, 3, SIZE, SIZE)
    assert torch.bincount(test_labels).tolist() == [TEST_PER_CLASS] * 3
    cache = fake_imagenet / ".mllmfl_cache"
    assert (cache / f"imagenet_lt_train_{SIZE}.npy").is_file()
    assert (cache / f"imagenet_lt_test_{SIZE}_labels.npy").is_file()
    assert not list(cache.glob("*.tmp*"))


def test_decode_resizes_the_shorter_side_and_centre_crops(tmp_path: Path) -> None:
    # Left third red, middle green, right third blue: the centre crop of a 3:1 image is all green.
    array = np.zeros((10, 30, 3), dtype=np.uint8)
    array[:, :10, 0] = array[:, 10:20, 1] = array[:, 20:, 2] = 255
    Image.fromarray(array).save(tmp_path / "wide.png")
    out = imagenet_lt_module._decode(tmp_path / "wide.png", 8)
    assert out.dtype == np.uint8 and out.shape == (3, 8, 8)
    centre = out[:, :, 2:6].reshape(3, -1).astype(int).mean(axis=1)
    assert centre[1] > 200 and centre[0] < 50 and centre[2] < 50


def test_second_build_uses_the_cache(fake_imagenet: Path, monkeypatch) -> None:
    first = load_imagenet_lt(str(fake_imagenet), "", SIZE)

    def no_decoding(path, size, *bounds):
        raise AssertionError(f"decoded {path} although the cache is current")

    monkeypatch.setattr(imagenet_lt_module, "_decode", no_decoding)
    second = load_imagenet_lt(str(fake_imagenet), "", SIZE)
    assert torch.equal(first.train_images, second.train_images)
    assert torch.equal(first.test_images, second.test_images)
    assert np.array_equal(first.train_labels, second.train_labels)
    data = build_client_data(_data(fake_imagenet), PartitionConfig("iid", 0.5), 2, 0)
    assert data.train_class_counts() == list(TRAIN_COUNTS)
    # Cached images are copy-on-write maps: writing one changes neither the file nor a later load.
    second.train_images[0].zero_()
    assert torch.equal(load_imagenet_lt(str(fake_imagenet), "", SIZE).train_images, first.train_images)


def test_a_changed_list_rebuilds_the_cache(fake_imagenet: Path, monkeypatch) -> None:
    load_imagenet_lt(str(fake_imagenet), "", SIZE)
    train_list = fake_imagenet / "ImageNet_LT_train.txt"
    lines = train_list.read_text().splitlines()
    train_list.write_text("\n".join(lines[1:]) + "\n")  # one head-class image fewer
    later = time.time() + 5
    os.utime(train_list, (later, later))
    calls = []
    real = imagenet_lt_module._decode
    monkeypatch.setattr(
        imagenet_lt_module, "_decode", lambda path, size, *bounds: calls.append(path) or real(path, size, *bounds)
    )
    arrays = load_imagenet_lt(str(fake_imagenet), "", SIZE)
    assert len(calls) == sum(TRAIN_COUNTS) - 1  # train rebuilt; test cache still current
    assert np.bincount(arrays.train_labels).tolist() == [TRAIN_COUNTS[0] - 1, *TRAIN_COUNTS[1:]]
    # The rebuilt entry counts as newer than the list even though the list's mtime lies in the future.
    calls.clear()
    load_imagenet_lt(str(fake_imagenet), "", SIZE)
    assert calls == []


def test_class_names_from_the_synset_mapping(fake_imagenet: Path) -> None:
    (fake_imagenet / "LOC_synset_mapping.txt").write_text(
        f"{SYNSETS[0]} tench, Tinca tinca\n{SYNSETS[1]} goldfish, Carassius auratus\n"
    )
    names = load_imagenet_lt(str(fake_imagenet), "", SIZE).class_names
    assert names == ("tench", "goldfish", SYNSETS[2])  # an unmapped synset keeps its id


def test_lists_dir_separate_from_root(fake_imagenet: Path, tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    for name in ("ImageNet_LT_train.txt", "ImageNet_LT_test.txt"):
        (fake_imagenet / name).rename(lists / name)
    arrays = load_imagenet_lt(str(fake_imagenet), str(lists), SIZE)
    assert len(arrays.train_labels) == sum(TRAIN_COUNTS)


def test_missing_list_file_names_it_and_the_key(fake_imagenet: Path, tmp_path: Path) -> None:
    (fake_imagenet / "ImageNet_LT_test.txt").unlink()
    with pytest.raises(DataError, match="ImageNet_LT_test.txt.*data.lists_dir") as err:
        build_client_data(_data(fake_imagenet), PartitionConfig("iid", 0.5), 2, 0)
    assert str(fake_imagenet / "ImageNet_LT_test.txt") in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="data.lists_dir"):
        load_imagenet_lt(str(fake_imagenet), str(tmp_path / "nolists"), SIZE)


def test_missing_image_is_named(fake_imagenet: Path) -> None:
    missing = fake_imagenet / "train" / SYNSETS[1] / f"{SYNSETS[1]}_2.JPEG"
    missing.unlink()
    with pytest.raises(DataError, match="does not exist") as err:
        build_client_data(_data(fake_imagenet), PartitionConfig("iid", 0.5), 2, 0)
    assert str(missing) in str(err.value) and "ImageNet_LT_train.txt line 9" in str(err.value)
    assert not list((fake_imagenet / ".mllmfl_cache").glob("imagenet_lt_train_*.npy*"))


def test_missing_root_and_bad_labels(fake_imagenet: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.root"):
        load_imagenet_lt(str(tmp_path / "noroot"), "", SIZE)
    with pytest.raises(DataError, match="data.root is empty"):
        load_imagenet_lt("", "", SIZE)
    test_list = fake_imagenet / "ImageNet_LT_test.txt"
    test_list.write_text(test_list.read_text() + f"\nval/{SYNSETS[0]}/x.JPEG 7\n")  # after a blank line
    with pytest.raises(DataError, match=f"line {3 * TEST_PER_CLASS + 2}: label 7 is out of range"):
        load_imagenet_lt(str(fake_imagenet), "", SIZE)
    test_list.write_text(f"val/{SYNSETS[0]}/x.JPEG -1\n")
    with pytest.raises(DataError, match="line 1"):
        load_imagenet_lt(str(fake_imagenet), "", SIZE)


def test_corrupt_image_is_named(fake_imagenet: Path) -> None:
    broken = fake_imagenet / "val" / SYNSETS[0] / f"ILSVRC2012_val_0{0:07d}.JPEG"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot decode") as err:
        load_imagenet_lt(str(fake_imagenet), "", SIZE)
    assert str(broken) in str(err.value)


def test_bad_list_entries_are_one_line(fake_imagenet: Path) -> None:
    """A stray large label (it would make a model with that many, mostly empty, classes), a path leaving
    data.root, a binary file in place of a list, and a truncated JPEG: each one clear DataError."""
    train_list = fake_imagenet / "ImageNet_LT_train.txt"
    good = train_list.read_text()
    train_list.write_text(good + f"train/{SYNSETS[0]}/{SYNSETS[0]}_0.JPEG 999\n")
    with pytest.raises(DataError, match=r"labels go up to 999 \(line 11\) but 996 classes below that have no image"):
        load_imagenet_lt(str(fake_imagenet), "", SIZE)
    for entry in ("../../etc/passwd.JPEG 0", "/etc/hosts 0", "train/../../x.JPEG 1"):
        train_list.write_text(good + entry + "\n")
        with pytest.raises(DataError, match="line 11: .* is not a path inside data.root"):
            load_imagenet_lt(str(fake_imagenet), "", SIZE)
    train_list.write_bytes(b"\x1f\x8b\x08\x00\xff\xfe binary")
    with pytest.raises(DataError, match="ImageNet_LT_train.txt is not UTF-8 text"):
        load_imagenet_lt(str(fake_imagenet), "", SIZE)
    train_list.write_text(good)
    cut = fake_imagenet / "train" / SYNSETS[0] / f"{SYNSETS[0]}_1.JPEG"
    cut.write_bytes(cut.read_bytes()[:40])
    with pytest.raises(DataError, match="cannot decode the image") as err:
        load_imagenet_lt(str(fake_imagenet), "", SIZE)
    assert str(cut) in str(err.value) and "\n" not in str(err.value)


def test_a_killed_cache_build_leaves_no_litter_after_the_next_build(fake_imagenet: Path) -> None:
    cache = fake_imagenet / ".mllmfl_cache"
    cache.mkdir()
    litter = [cache / f"imagenet_lt_train_{SIZE}.npy.tmp4242", cache / f"imagenet_lt_train_{SIZE}_labels.npy.tmp4242"]
    for path in litter:
        path.write_bytes(b"\x93NUMPY half")  # what a build killed mid-way leaves (gigabytes for the real split)
    keep = cache / "notes.tmp1"
    keep.write_text("not ours")
    load_imagenet_lt(str(fake_imagenet), "", SIZE)
    assert not any(p.exists() for p in litter) and keep.exists()
