"""The headline accuracy is balanced (the mean of per-class accuracies); plain top-1 is kept beside it."""

import json
import logging
from pathlib import Path

import pytest
import torch

from mllmfl_dist.__main__ import main
from mllmfl_dist.data.shards import expand_shards, read_labeled_shards
from mllmfl_dist.fl.evaluate import accuracy_report, imbalance_warning

REPO = Path(__file__).resolve().parents[1]
LT_TRAIN = str(REPO / "shards" / "fmnist_lt" / "train-*.tar.gz")
CLASSES = [f"c{i}" for i in range(10)]


def lt_labels() -> torch.Tensor:
    return read_labeled_shards(expand_shards(LT_TRAIN))[1].long()


def test_a_model_predicting_only_the_head_class_scores_chance_balanced_accuracy():
    labels = lt_labels()  # the shipped long-tailed set: 300, 179, ..., 3 images per class
    report = accuracy_report(torch.zeros_like(labels), labels, 10, [1000] * 10)
    assert report["acc_top1"] == pytest.approx(300 / 740)  # 0.405
    assert report["acc"] == pytest.approx(0.1)  # one class of ten right
    assert report["per_class"] == [1.0] + [0.0] * 9


def test_balanced_accuracy_is_the_mean_over_the_classes_present():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])  # class 3 absent from the test set
    predictions = torch.tensor([0, 1, 1, 1, 2, 0])
    report = accuracy_report(predictions, labels, 4, [200, 50, 10, 5])
    assert report["acc"] == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)
    assert report["acc_top1"] == pytest.approx(3 / 6)
    assert report["per_class"][3] is None and report["acc_few"] == pytest.approx(0.5)


def test_an_imbalanced_test_set_is_named_in_a_warning():
    message = imbalance_warning(lt_labels(), CLASSES)
    assert "imbalanced" in message and "3 images of class 9" in message and "300 of class 0" in message
    assert imbalance_warning(torch.arange(10).repeat(50), CLASSES) is None
    assert imbalance_warning(torch.tensor([0] * 100 + [1] * 98), CLASSES[:2]) is None  # within a few percent
    assert imbalance_warning(torch.tensor([0] * 100 + [1] * 90), CLASSES[:2]) is not None


def test_federate_on_a_long_tailed_test_set_reports_balanced_acc_and_warns(tmp_path, caplog, capsys):
    """The issue's reproduction: the shipped LT train shards as the test set."""
    sets = [
        "model.pretrained_backbone=",
        "federated.rounds=2",
        "eval.every=1",
        f"data.test_shards={LT_TRAIN}",
        f"run.root={tmp_path}",
        "log.progress=false",
        "log.tensorboard=false",
    ]
    with caplog.at_level(logging.WARNING):
        assert (
            main(["federate", str(REPO / "configs" / "tiny_mllm.toml"), *[a for s in sets for a in ("--set", s)]]) == 0
        )
    assert any("the test set is imbalanced" in r.getMessage() for r in caplog.records)
    records = [json.loads(line) for line in (tmp_path / "tiny_mllm" / "federated" / "metrics.jsonl").open()]
    for record in records:
        present = [a for a in record["per_class"] if a is not None]
        assert record["acc"] == pytest.approx(sum(present) / len(present))
        assert 0 <= record["acc_top1"] <= 1
    assert any(abs(r["acc"] - r["acc_top1"]) > 0.05 for r in records)
    assert "balanced acc" in capsys.readouterr().out
