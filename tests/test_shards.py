"""WebDataset shards: writer/reader round trip, pattern expansion, damage handling, the ``shards`` CLI,
the ``shards`` client-data source, and the shipped shards under ``shards/``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mllmfl_dist.commands import shards as shards_command
from mllmfl_dist.config import DataConfig, PartitionConfig
from mllmfl_dist.data import DataError, build_client_data, longtail_counts
from mllmfl_dist.data.shards import (
    CorruptImageError,
    ShardError,
    decode_image,
    expand_shards,
    image_to_array,
    iter_samples,
    read_labeled_shards,
    write_shards,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "shards"
FMNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def make_samples(n: int, channels: int = 1, size: int = 12, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "key": f"sample_{i:04d}",
            "image": rng.integers(0, 256, (channels, size, size), dtype=np.uint8),
            "cls": i % 3,
            "txt": f"a caption, number {i} – ünïcode",
            "json": {"index": i, "source": "test"},
        }
        for i in range(n)
    ]


def suffix(compress: bool) -> str:
    return ".tar.gz" if compress else ".tar"


# ------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("channels", [1, 3])
def test_round_trip_is_exact(tmp_path: Path, compress: bool, channels: int) -> None:
    samples = make_samples(10, channels)
    paths = write_shards(samples, str(tmp_path / "train"), max_count=4, compress=compress)
    assert [p.name for p in paths] == [f"train-00000{i}{suffix(compress)}" for i in range(3)]
    read = [s for p in paths for s in iter_samples(p)]
    assert [len(list(iter_samples(p))) for p in paths] == [4, 4, 2]
    assert [s["key"] for s in read] == [s["key"] for s in samples]
    for want, got in zip(samples, read):
        assert got["image_ext"] == "png" and got["error"] is None
        image = decode_image(got["image_bytes"])
        assert image.mode == ("L" if channels == 1 else "RGB")
        assert np.array_equal(image_to_array(image), want["image"])
        assert (got["cls"], got["txt"], got["json"]) == (want["cls"], want["txt"], want["json"])
    images, labels, keys = read_labeled_shards(paths)
    assert images.dtype == torch.uint8 and images.shape == (10, channels, 12, 12)
    assert torch.equal(images, torch.from_numpy(np.stack([s["image"] for s in samples])))
    assert labels.tolist() == [s["cls"] for s in samples] and keys == [s["key"] for s in samples]


@pytest.mark.parametrize("compress", [True, False])
def test_webdataset_reads_the_shards(tmp_path: Path, compress: bool) -> None:
    import webdataset

    samples = make_samples(6)
    paths = write_shards(samples, str(tmp_path / "s"), max_count=4, compress=compress)
    url = str(tmp_path / f"s-{{000000..000001}}{suffix(compress)}")
    got = list(webdataset.WebDataset(url, shardshuffle=False).decode("pill"))
    assert len(paths) == 2 and [g["__key__"] for g in got] == [s["key"] for s in samples]
    for want, g in zip(samples, got):
        assert np.array_equal(np.asarray(g["png"]), want["image"][0])
        assert (g["cls"], g["txt"], g["json"]) == (want["cls"], want["txt"], want["json"])


def test_writer_is_deterministic_and_refuses_to_mix_with_old_shards(tmp_path: Path) -> None:
    first = write_shards(make_samples(9), str(tmp_path / "a" / "x"), max_count=3)
    second = write_shards(make_samples(9), str(tmp_path / "b" / "x"), max_count=3)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    with pytest.raises(DataError, match="already exist.*--overwrite"):
        write_shards(make_samples(2), str(tmp_path / "a" / "x"), max_count=3)
    # --overwrite removes the stale shards of a larger earlier build
    again = write_shards(make_samples(2), str(tmp_path / "a" / "x"), max_count=3, overwrite=True)
    assert sorted((tmp_path / "a").iterdir()) == again == [tmp_path / "a" / "x-000000.tar.gz"]


def test_writer_keeps_given_image_bytes_and_rejects_bad_keys(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (5, 4), (10, 20, 30)).save(buf, format="JPEG")
    paths = write_shards([{"key": "photo", "image_bytes": buf.getvalue(), "image_ext": "jpg"}], str(tmp_path / "j"), 5)
    (sample,) = iter_samples(paths[0])
    assert sample["image_ext"] == "jpg" and sample["image_bytes"] == buf.getvalue() and sample["cls"] is None
    with pytest.raises(ValueError, match="without '.'"):
        write_shards([{"key": "a.b", "image": np.zeros((4, 4), np.uint8)}], str(tmp_path / "k"), 5)
    with pytest.raises(ValueError, match="duplicate"):
        write_shards(
            [{"key": f"a{i % 3}", "image": np.zeros((4, 4), np.uint8)} for i in range(4)], str(tmp_path / "d"), 2
        )
    assert not list(tmp_path.glob("d-*"))  # a failed write leaves no shard and no .partial file


# ------------------------------------------------------------------------------------ expansion


def test_expand_shards_braces_globs_and_errors(tmp_path: Path) -> None:
    paths = write_shards(make_samples(8), str(tmp_path / "train"), max_count=2)
    assert len(paths) == 4
    assert expand_shards(str(tmp_path / "train-{000000..000003}.tar.gz")) == paths
    assert expand_shards(str(tmp_path / "train-{000001,000003}.tar.gz")) == [paths[1], paths[3]]
    assert expand_shards(str(tmp_path / "train-*.tar.gz")) == paths
    assert expand_shards(str(tmp_path / "train-00000[0-1].tar.gz")) == paths[:2]
    assert expand_shards(str(tmp_path)) == paths  # a folder: the shards in it
    with pytest.raises(DataError, match=r"no shard file matches .*nothing-\*\.tar"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(DataError, match=r"train-000004\.tar\.gz .*does not exist"):
        expand_shards(str(tmp_path / "train-{000000..000004}.tar.gz"))


# ---------------------------------------------------------------------------------------- damage


@pytest.mark.parametrize("compress", [True, False])
def test_truncated_shard_yields_the_samples_before_the_damage_then_raises(tmp_path: Path, compress: bool) -> None:
    (path,) = write_shards(make_samples(8, size=16), str(tmp_path / "t"), max_count=8, compress=compress)
    data = path.read_bytes()
    damaged = tmp_path / f"damaged{suffix(compress)}"
    damaged.write_bytes(data[: len(data) // 2])
    got = []
    with pytest.raises(ShardError, match=rf"shard {damaged} is damaged after sample") as info:
        for sample in iter_samples(damaged):
            got.append(sample["key"])
    assert isinstance(info.value, DataError)  # callers catch it with the package's DataError
    assert 1 <= len(got) < 8 and got == [f"sample_{i:04d}" for i in range(len(got))]
    # a caller that reports and goes on: catch, name the shard, continue with the next one
    ok, failed = 0, []
    for shard in (damaged, path):
        try:
            for _ in iter_samples(shard):
                ok += 1
        except DataError as err:
            failed.append((shard, str(err)))
    assert ok == len(got) + 8 and [f[0] for f in failed] == [damaged]
    with pytest.raises(DataError, match=str(damaged)):
        read_labeled_shards([damaged])


def test_plain_tar_cut_at_a_member_boundary_is_detected(tmp_path: Path) -> None:
    import tarfile

    (path,) = write_shards(make_samples(4), str(tmp_path / "t"), max_count=8, compress=False)
    with tarfile.open(path) as tar:
        third = [m for m in tar.getmembers() if m.name.startswith("sample_0002")][0]
    damaged = tmp_path / "cut.tar"
    damaged.write_bytes(path.read_bytes()[: third.offset])  # no end-of-archive block: tarfile alone is silent
    got = []
    with pytest.raises(ShardError, match="end-of-archive"):
        for sample in iter_samples(damaged):
            got.append(sample["key"])
    assert got == ["sample_0000"]  # sample_0001 may lack members, so it is not yielded


def test_not_a_shard_and_missing_shard(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(ShardError, match="before its first sample"):
        list(iter_samples(junk))
    with pytest.raises(ShardError, match="does not exist"):
        list(iter_samples(tmp_path / "missing.tar"))


def test_corrupt_image_bytes_raise_on_decode(tmp_path: Path) -> None:
    good = make_samples(1)[0]["image"]
    (path,) = write_shards(
        [
            {"key": "good", "image": good},
            {"key": "bad", "image_bytes": b"\x89PNG\r\n\x1a\n garbage", "image_ext": "png", "cls": 1},
        ],
        str(tmp_path / "c"),
        max_count=4,
    )
    samples = list(iter_samples(path))  # the shard itself is fine
    assert np.array_equal(image_to_array(decode_image(samples[0]["image_bytes"])), good)
    with pytest.raises(CorruptImageError, match="cannot decode image"):
        decode_image(samples[1]["image_bytes"])
    png = samples[0]["image_bytes"]
    with pytest.raises(CorruptImageError):
        decode_image(png[: len(png) // 2])  # truncated PNG
    with pytest.raises(DataError, match=r"sample 'good': no \.cls"):
        read_labeled_shards([path])


def test_read_labeled_shards_rejects_mixed_sizes(tmp_path: Path) -> None:
    samples = make_samples(3) + [{"key": "big", "image": np.zeros((1, 13, 13), np.uint8), "cls": 0}]
    (path,) = write_shards(samples, str(tmp_path / "m"), max_count=8)
    with pytest.raises(DataError, match=rf"shard {path}, sample 'big': image is 13x13 with 1 channel"):
        read_labeled_shards([path])


# ------------------------------------------------------------------------------------------- CLI


def _png(path: Path, value: int, mode: str = "L", size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if mode == "L" else (value, 255 - value, 7)
    Image.new(mode, (size, size), colour).save(path)


def test_cli_packs_a_folder_with_labels_from_subfolders(tmp_path: Path, capsys) -> None:
    src = tmp_path / "images"
    for i in range(3):
        _png(src / "cat" / f"{i}.png", 10 + i)
    for i in range(2):
        _png(src / "dog" / "nested" / f"{i}.png", 50 + i)
    _png(src / "ant" / "a.PNG", 90)
    (src / "ant" / "notes.txt").write_text("not an image")
    (src / "ant" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    rc = shards_command.main(
        ["--from-folder", str(src), "--labels-from-subfolders", "--out", str(out), "--max-count", "2"]
    )
    assert rc == 0
    report = capsys.readouterr().out
    assert "wrote 6 samples to 3 shards" in report and "skipped 1 unreadable image: ant/broken.png" in report
    assert json.loads((out / "classes.json").read_text()) == ["ant", "cat", "dog"]
    paths = expand_shards(str(out / "images-*.tar.gz"))
    assert [len(list(iter_samples(p))) for p in paths] == [2, 2, 2]
    images, labels, keys = read_labeled_shards(paths)
    assert keys == ["ant_a", "cat_0", "cat_1", "cat_2", "dog_nested_0", "dog_nested_1"]
    assert labels.tolist() == [0, 1, 1, 1, 2, 2]
    assert images[:, 0, 0, 0].tolist() == [90, 10, 11, 12, 50, 51]
    first = next(iter_samples(paths[0]))
    assert first["json"] == {"source": "folder", "path": "ant/a.PNG", "class": "ant"}
    # the original PNG bytes are stored unchanged
    assert first["image_bytes"] == (src / "ant" / "a.PNG").read_bytes()


def test_cli_folder_without_labels_and_mixed_modes(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    _png(src / "grey.png", 3)
    _png(src / "rgb.png", 4, mode="RGB")
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(src / "alpha.png")
    Image.new("RGB", (8, 8), (200, 100, 0)).save(src / "photo.jpg", quality=95)
    rc = shards_command.main(["--from-folder", str(src), "--out", str(tmp_path / "o"), "--no-compress"])
    assert rc == 0 and not (tmp_path / "o" / "classes.json").exists()
    (path,) = expand_shards(str(tmp_path / "o" / "images-*.tar"))
    samples = {s["key"]: s for s in iter_samples(path)}
    assert sorted(samples) == ["alpha", "grey", "photo", "rgb"]
    assert all(s["cls"] is None for s in samples.values())
    assert samples["photo"]["image_ext"] == "jpg"  # JPEGs are kept, not re-encoded
    assert decode_image(samples["grey"]["image_bytes"]).mode == "L"
    assert decode_image(samples["alpha"]["image_bytes"]).mode == "RGB"  # converted, alpha dropped


def test_cli_packs_a_data_source(tmp_path: Path, capsys) -> None:
    out = tmp_path / "syn"
    rc = shards_command.main(
        ["--from-source", "synthetic", "--split", "train", "--per-class", "5", "--out", str(out), "--max-count", "16"]
    )
    assert rc == 0
    paths = expand_shards(str(out / "train-*.tar.gz"))
    assert [len(list(iter_samples(p))) for p in paths] == [16, 16, 16, 2]
    images, labels, keys = read_labeled_shards(paths)
    assert images.shape == (50, 3, 16, 16) and np.bincount(labels.numpy()).tolist() == [5] * 10
    assert json.loads((out / "classes.json").read_text()) == [f"class_{c}" for c in range(10)]
    # the stored pixels and labels are the source's, at the indices named in .json
    from mllmfl_dist.data.synthetic import synthetic_arrays

    arrays = synthetic_arrays(DataConfig(source="synthetic"), 0)
    index = [s["json"]["index"] for p in paths for s in iter_samples(p)]
    assert torch.equal(images, arrays.train_images[index])
    assert labels.tolist() == arrays.train_labels[index].tolist()
    assert keys[0] == f"synthetic_train_{index[0]:06d}"
    # long tail with the package's rule, and unlabeled output
    capsys.readouterr()
    rc = shards_command.main(
        [
            "--from-source",
            "synthetic",
            "--split",
            "test",
            "--imb-factor",
            "0.1",
            "--no-labels",
            "--out",
            str(tmp_path / "lt"),
            "--max-count",
            "1000",
        ]
    )
    assert rc == 0
    samples = [s for p in expand_shards(str(tmp_path / "lt")) for s in iter_samples(p)]
    assert len(samples) == sum(longtail_counts(50, 10, 0.1)) and all(s["cls"] is None for s in samples)
    assert "class" not in samples[0]["json"] and not (tmp_path / "lt" / "classes.json").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--from-folder", "{tmp}/missing"], "no such folder"),
        (["--from-folder", "{tmp}/empty"], "no .png/.jpg/.jpeg/.webp image"),
        (["--from-folder", "{tmp}/loose", "--labels-from-subfolders"], "is not inside a class subfolder"),
        (["--from-source", "synthetic"], "needs --split"),
        (["--from-source", "synthetic", "--split", "train", "--indices", "5:3"], "--indices 5:3"),
        (["--from-source", "synthetic", "--split", "train", "--max-count", "0"], "--max-count 0"),
        (["--from-folder", "{tmp}/loose", "--per-class", "3"], "--per-class is an option of --from-source"),
        (["--from-source", "fashion_mnist", "--split", "train", "--root", "{tmp}/empty"], "data.root"),
    ],
)
def test_cli_user_errors_exit_2(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    _png(tmp_path / "loose" / "x.png", 1)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--out", str(tmp_path / "out")]
    assert shards_command.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mllmfl_dist: error:") and message in err and err.count("\n") == 1


def test_cli_refuses_to_overwrite_without_the_flag(tmp_path: Path, capsys) -> None:
    argv = ["--from-source", "synthetic", "--split", "test", "--per-class", "2", "--out", str(tmp_path)]
    assert shards_command.main(argv) == 0
    assert shards_command.main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert shards_command.main(argv + ["--overwrite"]) == 0


# ----------------------------------------------------------------------- shards as client data


def shards_config(**overrides) -> DataConfig:
    values = dict(
        source="shards",
        train_shards=str(SHIPPED / "fmnist_lt" / "train-*.tar.gz"),
        test_shards=str(SHIPPED / "fmnist_lt" / "test-{000000..000001}.tar.gz"),
        imb_factor=1.0,
    )
    values.update(overrides)
    return DataConfig(**values)


LT_COUNTS = longtail_counts(300, 10, 0.01)


@pytest.mark.parametrize("imb_factor", [1.0, 0.01])
def test_build_client_data_from_the_shipped_lt_shards(imb_factor: float) -> None:
    assert LT_COUNTS == [300, 179, 107, 64, 38, 23, 13, 8, 5, 3]  # the counts shards/README.md documents
    data = build_client_data(shards_config(imb_factor=imb_factor), PartitionConfig("dirichlet", 0.5), 20, seed=0)
    assert data.train_class_counts() == LT_COUNTS  # already long-tailed; 0.01 again selects the same set
    assert sum(data.client_size(c) for c in range(20)) == 740
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 28)
    assert data.class_names == FMNIST_CLASSES
    test_images, test_labels = data.test_set()
    assert test_images.shape == (1000, 1, 28, 28) and torch.bincount(test_labels).tolist() == [100] * 10
    images, _ = data.client(0)
    assert images.dtype == torch.uint8
    train, _, _ = read_labeled_shards(str(SHIPPED / "fmnist_lt" / "train-*.tar.gz"))
    pixels = train.to(torch.float64) / 255
    assert data.mean == pytest.approx((float(pixels.mean()),))
    assert data.std == pytest.approx((float(pixels.std(correction=0)),))


def test_shipped_shards_hold_the_real_fashion_mnist_pixels() -> None:
    from mllmfl_dist.data.sources import load_fashion_mnist

    try:
        fmnist = load_fashion_mnist("")
    except DataError:
        pytest.skip("Fashion-MNIST raw files not installed (apt-get install dataset-fashion-mnist)")
    for pattern, split in (
        ("fmnist_lt/train-*.tar.gz", "train"),
        ("fmnist_lt/test-*.tar.gz", "test"),
        ("fmnist_align/align-*.tar.gz", "train"),
    ):
        paths = expand_shards(str(SHIPPED / pattern))
        index = [s["json"]["index"] for p in paths for s in iter_samples(p)]
        images, labels, _ = read_labeled_shards(paths)
        want_images = fmnist.train_images if split == "train" else fmnist.test_images
        want_labels = torch.as_tensor(fmnist.train_labels) if split == "train" else fmnist.test_labels
        assert torch.equal(images, want_images[index]) and torch.equal(labels, want_labels[index])
    pool = [s for p in expand_shards(str(SHIPPED / "pool" / "pool-*.tar.gz")) for s in iter_samples(p)]
    index = [s["json"]["index"] for s in pool]
    stacked = torch.stack([torch.from_numpy(image_to_array(decode_image(s["image_bytes"]))) for s in pool])
    assert torch.equal(stacked, fmnist.train_images[index])


def test_missing_shards_name_the_pattern_and_the_key(tmp_path: Path) -> None:
    pattern = str(tmp_path / "nope-*.tar.gz")
    with pytest.raises(DataError, match=r"data\.train_shards = .*nope-\*\.tar\.gz"):
        build_client_data(shards_config(train_shards=pattern), PartitionConfig(), 4, seed=0)
    with pytest.raises(DataError, match=r"data\.test_shards is empty"):
        build_client_data(shards_config(test_shards=""), PartitionConfig(), 4, seed=0)


def test_relative_patterns_fall_back_to_the_repository_root(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = shards_config(train_shards="shards/fmnist_lt/train-*.tar.gz", test_shards="shards/fmnist_lt/test-*.tar.gz")
    data = build_client_data(cfg, PartitionConfig("iid", 0.5), 5, seed=1)
    assert data.train_class_counts() == LT_COUNTS


def test_class_names_default_without_classes_json(tmp_path: Path) -> None:
    write_shards(make_samples(9), str(tmp_path / "train"), max_count=100)
    write_shards(make_samples(6, seed=1), str(tmp_path / "test"), max_count=100)
    cfg = shards_config(train_shards=str(tmp_path / "train-*"), test_shards=str(tmp_path / "test-*"))
    data = build_client_data(cfg, PartitionConfig("iid", 0.5), 3, seed=0)
    assert data.class_names == ["class_0", "class_1", "class_2"] and data.train_class_counts() == [3, 3, 3]


# -------------------------------------------------------------------------------- shipped shards


def test_shipped_shards_are_small() -> None:
    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert any(p.name.endswith(".tar.gz") for p in files)
    assert total < 10 * 1024 * 1024, f"shards/ holds {total / 1e6:.2f} MB"


def _indices(pattern: str) -> list[int]:
    return [s["json"]["index"] for p in expand_shards(str(SHIPPED / pattern)) for s in iter_samples(p)]


def test_shipped_sets_are_disjoint_and_as_documented() -> None:
    lt_train = _indices("fmnist_lt/train-*.tar.gz")
    align = _indices("fmnist_align/align-*.tar.gz")
    pool = _indices("pool/pool-*.tar.gz")
    assert len(lt_train) == 740 and len(align) == 200 and len(pool) == 512
    assert pool == list(range(59488, 60000))
    assert not set(pool) & set(lt_train) and not set(pool) & set(align) and not set(align) & set(lt_train)
    assert max(lt_train) < 59488 and all(50000 <= i < 59488 for i in align)
    pool_samples = [s for p in expand_shards(str(SHIPPED / "pool")) for s in iter_samples(p)]
    assert all(s["cls"] is None and "class" not in s["json"] for s in pool_samples)  # unlabeled
    _, align_labels, _ = read_labeled_shards(str(SHIPPED / "fmnist_align" / "align-*.tar.gz"))
    assert torch.bincount(align_labels).tolist() == [20] * 10
    for folder in ("fmnist_lt", "fmnist_align"):
        assert json.loads((SHIPPED / folder / "classes.json").read_text()) == FMNIST_CLASSES
    # every sample of the train split's sets says where it came from
    meta = next(iter_samples(expand_shards(str(SHIPPED / "fmnist_lt" / "train-*.tar.gz"))[0]))["json"]
    assert meta["source"] == "fashion_mnist" and meta["split"] == "train" and meta["class"] in FMNIST_CLASSES
