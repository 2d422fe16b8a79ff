"""The validation split (data.val_per_class), val beside test in every evaluation, and data.train_fraction."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mllmfl_dist.__main__ import main
from mllmfl_dist.config import DataConfig, PartitionConfig
from mllmfl_dist.core.progress import evaluation_line
from mllmfl_dist.core.seeds import TAG_LONGTAIL, derive_seed
from mllmfl_dist.data import ArrayClientData, DataError, build_client_data, longtail_indices, partition_indices
from mllmfl_dist.data.build import _holdout_indices
from mllmfl_dist.data.fraction import fraction_counts
from mllmfl_dist.data.sources import load_fashion_mnist
from mllmfl_dist.stages.report import report_markdown

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
# Synthetic, long-tailed, a window of the split kept out (like the shipped server-side sets), a holdout.
CONFIG = DataConfig(
    source="synthetic",
    samples_per_class=120,
    imb_factor=0.1,
    server_holdout_per_class=4,
    train_indices="0:1100",
    image_size=8,
)
PARTITION = PartitionConfig(alpha=0.5)
CLIENTS = 12


def all_client_indices(data: ArrayClientData) -> np.ndarray:
    return np.concatenate([data.client_indices(c) for c in range(data.num_clients)])


def test_the_val_split_is_balanced_and_disjoint_from_clients_holdout_excluded_range_and_test() -> None:
    data = build_client_data(dataclasses.replace(CONFIG, val_per_class=7), PARTITION, CLIENTS, seed=3)
    val = data.val_indices()
    images, labels = data.val_set()
    assert images.dtype == torch.uint8 and images.shape == (70, 3, 8, 8) and labels.dtype == torch.int64
    assert np.bincount(labels.numpy(), minlength=10).tolist() == [7] * 10
    assert len(np.unique(val)) == 70 and val.max() < 1100  # inside data.train_indices
    assert np.intersect1d(val, all_client_indices(data)).size == 0
    assert np.intersect1d(val, data._server_pool).size == 0
    # Each class's val images are the ones just before its holdout's, among the usable indices.
    train_labels = data._labels.numpy()[:1100]
    for c in range(10):
        members = np.flatnonzero(train_labels == c)
        assert np.array_equal(np.sort(val[labels.numpy() == c]), members[-11:-4])
    # The test set is a split of its own: no val image is one of its images.
    test_images = data.test_set()[0].flatten(1)
    assert not (images.flatten(1)[:, None, :] == test_images[None]).all(-1).any()


def test_adding_a_val_split_leaves_the_holdout_the_same_images() -> None:
    without = build_client_data(CONFIG, PARTITION, CLIENTS, seed=3)
    with_val = build_client_data(dataclasses.replace(CONFIG, val_per_class=7), PARTITION, CLIENTS, seed=3)
    assert len(without._server_pool) == 40
    assert np.array_equal(without._server_pool, with_val._server_pool)
    assert len(without.val_indices()) == 0 and without.val_set()[0].shape == (0, 3, 8, 8)


def test_val_per_class_0_gives_the_clients_the_partition_of_before_the_val_split() -> None:
    """The pipeline as it was before data.val_per_class, written out: holdout, long tail, partition."""
    data = build_client_data(CONFIG, PARTITION, CLIENTS, seed=3)
    labels = data._labels.numpy()
    usable = np.arange(1100)
    holdout = usable[_holdout_indices(labels[usable], 10, 4)]
    remaining = np.setdiff1d(usable, holdout)
    kept = remaining[longtail_indices(labels[remaining], 10, 0.1, seed=derive_seed(3, TAG_LONGTAIL))]
    parts = partition_indices(labels[kept], 10, CLIENTS, "dirichlet", 0.5, 3)
    for c, part in enumerate(parts):
        assert np.array_equal(data.client_indices(c), kept[part])


def test_a_too_large_val_split_and_an_overlapping_one_are_refused() -> None:
    with pytest.raises(DataError, match=r"data.val_per_class = 106 leaves class \d no training images"):
        build_client_data(dataclasses.replace(CONFIG, val_per_class=106), PARTITION, CLIENTS, seed=0)
    data = build_client_data(CONFIG, PARTITION, CLIENTS, seed=0)
    images, labels = data._images, data._labels
    clients = [data.client_indices(c) for c in range(CLIENTS)]
    with pytest.raises(ValueError, match="validation split overlaps the clients"):
        ArrayClientData(
            images,
            labels,
            clients,
            *data.test_set(),
            10,
            data.class_names,
            data.mean,
            data.std,
            val_indices=clients[0][:1],
        )
    with pytest.raises(ValueError, match="validation split overlaps the server pool"):
        ArrayClientData(
            images,
            labels,
            clients,
            *data.test_set(),
            10,
            data.class_names,
            data.mean,
            data.std,
            server_pool=data._server_pool,
            val_indices=data._server_pool[:1],
        )


def test_on_demand_synthetic_clients_refuse_a_val_split_and_a_fraction() -> None:
    on_demand = DataConfig(source="synthetic", synthetic_mode="on_demand")
    with pytest.raises(DataError, match="data.val_per_class = 5 needs fixed training images"):
        build_client_data(dataclasses.replace(on_demand, val_per_class=5), PARTITION, 4, seed=0)
    with pytest.raises(DataError, match="data.train_fraction = 0.5 needs fixed training images"):
        build_client_data(dataclasses.replace(on_demand, train_fraction=0.5), PARTITION, 4, seed=0)


def test_train_fraction_keeps_the_fraction_of_each_class_seeded_and_nested() -> None:
    config = dataclasses.replace(CONFIG, val_per_class=5)
    full = build_client_data(config, PARTITION, 4, seed=1)
    quarter = build_client_data(dataclasses.replace(config, train_fraction=0.25), PARTITION, 4, seed=1)
    counts = np.array(full.train_class_counts())
    assert quarter.train_class_counts() == fraction_counts(counts, 0.25).tolist()
    assert np.abs(np.array(quarter.train_class_counts()) - 0.25 * counts).max() <= 0.5
    assert np.isin(all_client_indices(quarter), all_client_indices(full)).all()
    # The val split and the holdout are cut before the fraction: the same images.
    assert np.array_equal(quarter.val_indices(), full.val_indices())
    assert np.array_equal(quarter._server_pool, full._server_pool)
    again = build_client_data(dataclasses.replace(config, train_fraction=0.25), PARTITION, 4, seed=1)
    assert np.array_equal(np.sort(all_client_indices(again)), np.sort(all_client_indices(quarter)))
    other_seed = build_client_data(dataclasses.replace(config, train_fraction=0.25), PARTITION, 4, seed=2)
    assert not np.array_equal(np.sort(all_client_indices(other_seed)), np.sort(all_client_indices(quarter)))
    tenth = build_client_data(dataclasses.replace(config, train_fraction=0.1), PARTITION, 4, seed=1)
    assert np.isin(all_client_indices(tenth), all_client_indices(quarter)).all()  # a smaller fraction: a subset
    assert (
        min(
            build_client_data(
                dataclasses.replace(config, train_fraction=0.01), PARTITION, 4, seed=1
            ).train_class_counts()
        )
        == 1
    )  # every class keeps an image


def test_fraction_counts_round_half_up_and_keep_one_image_of_every_present_class() -> None:
    assert fraction_counts(np.array([1000, 30, 10, 3, 0]), 0.1).tolist() == [100, 3, 1, 1, 0]
    assert fraction_counts(np.array([25, 5]), 0.1).tolist() == [3, 1]


def test_too_small_a_fraction_for_the_clients_is_one_line() -> None:
    with pytest.raises(DataError, match="cannot give each of 500 clients one sample"):
        build_client_data(dataclasses.replace(CONFIG, train_fraction=0.5), PARTITION, 500, seed=0)


@pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_fashion_mnist_val_is_drawn_from_the_usable_range_before_the_holdout() -> None:
    config = DataConfig(
        source="fashion_mnist", train_indices="0:50000", server_holdout_per_class=20, imb_factor=0.01, val_per_class=100
    )
    data = build_client_data(config, PartitionConfig(), 100, seed=0)
    val, pool = data.val_indices(), data._server_pool
    assert len(val) == 1000 and val.max() < 50000 and pool.max() < 50000  # shipped sets are 50000-59999
    assert np.intersect1d(val, pool).size == 0 and np.intersect1d(val, all_client_indices(data)).size == 0
    assert np.bincount(data.val_set()[1].numpy()).tolist() == [100] * 10
    labels = load_fashion_mnist("").train_labels[:50000]
    for c in range(10):  # the holdout is the last 20 usable images of a class, val the 100 before them
        members = np.flatnonzero(labels == c)
        assert np.array_equal(np.sort(pool[labels[pool] == c]), members[-20:])
        assert np.array_equal(np.sort(val[labels[val] == c]), members[-120:-20])


def test_metrics_summary_report_and_evaluate_show_val_beside_test(tmp_path, capsys) -> None:
    sets = [
        "--set",
        f"run.root={tmp_path}",
        "--set",
        "federated.rounds=2",
        "--set",
        "eval.every=1",
        "--set",
        "data.val_per_class=10",
        "--set",
        "log.tensorboard=false",
        "--set",
        "log.progress=false",
    ]
    assert main(["federate", str(SMOKE), *sets]) == 0
    out = tmp_path / "smoke" / "federated"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert {"acc", "acc_top1", "per_class", "val_acc", "val_acc_top1", "val_acc_many"} <= record.keys()
        assert 0.0 <= record["val_acc"] <= 1.0
        # a balanced val split of 10 per class: balanced accuracy is top-1
        assert record["val_acc"] == pytest.approx(record["val_acc_top1"])
    assert f"; val balanced acc {records[-1]['val_acc']:.4f}" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["val_acc"] == records[-1]["val_acc"]
    capsys.readouterr()
    assert main(["evaluate", str(SMOKE), "--checkpoint", str(out / "model_final.pt"), *sets]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["val_acc"] == pytest.approx(records[-1]["val_acc"])
    assert report["acc"] == pytest.approx(records[-1]["acc"])
    assert main(["report", str(tmp_path / "smoke")]) == 0
    markdown = (tmp_path / "smoke" / "report" / "report.md").read_text()
    assert "| val balanced acc | val top-1 |" in markdown and f"| {records[-1]['val_acc']:.3f} |" in markdown


def test_a_run_without_val_writes_no_val_keys(tmp_path) -> None:
    sets = ["--set", f"run.root={tmp_path}", "--set", "federated.rounds=1", "--set", "log.tensorboard=false"]
    assert main(["federate", str(SMOKE), *sets]) == 0
    record = json.loads((tmp_path / "smoke" / "federated" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "acc" in record and not [k for k in record if k.startswith("val_")]


def test_the_evaluation_line_and_the_report_table_show_val_only_where_there_is_one() -> None:
    record = {"round": 4, "acc": 0.5, "acc_many": 0.6, "acc_medium": None, "acc_few": 0.1}
    assert "val" not in evaluation_line(record, 10, 1.0)
    assert "acc 0.5000 (many 0.6000, medium -, few 0.1000), val acc 0.4321, 1.00 s/round" in evaluation_line(
        {**record, "val_acc": 0.4321}, 10, 1.0
    )
    plain = report_markdown({"run_dir": "r", "federated": {"round": 4, "acc": 0.5}})
    assert "val" not in plain
    both = report_markdown(
        {"run_dir": "r", "federated": {"round": 4, "acc": 0.5, "val_acc": 0.25, "val_acc_top1": 0.25}}
    )
    assert "| method, round 4 | 0.500 | — | — | — | — | 0.250 | 0.250 |" in both


def test_an_aligned_round_records_val_before_and_after_alignment(tmp_path) -> None:
    sets = [
        "--set",
        f"run.root={tmp_path}",
        "--set",
        "federated.rounds=1",
        "--set",
        "log.tensorboard=false",
        "--set",
        "data.val_per_class=5",
        "--set",
        "data.server_holdout_per_class=5",
        "--set",
        "align.every=1",
        "--set",
        "align.source=holdout",
        "--set",
        "align.per_class=5",
        "--set",
        "align.steps=5",
        "--set",
        "align.lr=0.5",
    ]
    assert main(["federate", str(SMOKE), *sets]) == 0
    record = json.loads((tmp_path / "smoke" / "federated" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"acc", "val_acc", "val_acc_top1"} <= record["before_align"].keys()
    assert {"acc", "val_acc", "val_acc_top1", "align_loss"} <= record.keys()
