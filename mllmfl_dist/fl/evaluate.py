"""Accuracy on the test set: balanced (the headline ``acc``), plain top-1, per class, and Many / Medium / Few;
and on the validation split (``val_acc``, ...) beside it, where the data have one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mllmfl_dist.core.jsonl import ACCURACY_KEYS
from mllmfl_dist.data import ClientData, normalize

# Classes with more than 100 training samples are "many", 20-100 "medium", fewer than 20 "few".
MANY_ABOVE = 100
FEW_BELOW = 20


def class_groups(train_class_counts: Sequence[int]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for cls, count in enumerate(train_class_counts):
        if count > MANY_ABOVE:
            groups["many"].append(cls)
        elif count < FEW_BELOW:
            groups["few"].append(cls)
        else:
            groups["medium"].append(cls)
    return groups


def accuracy_report(
    predictions: torch.Tensor, labels: torch.Tensor, num_classes: int, train_class_counts: Sequence[int]
) -> dict[str, Any]:
    """Accuracy of ``predictions`` against ``labels`` (int64 ``[N]`` each):

    - ``acc``: balanced accuracy, the mean of the per-class accuracies over the classes present in the test
      set (what DESIGN.md and the long-tail literature report; on a balanced test set it equals top-1);
    - ``acc_top1``: plain top-1 accuracy, the fraction of all test images predicted right;
    - ``per_class``: accuracy of each class (None for a class absent from the test set);
    - ``acc_many`` / ``acc_medium`` / ``acc_few``: the mean over the group's present classes (None if none).
    """
    correct = (predictions == labels).to(torch.float64)
    hits = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, correct)
    totals = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    per_class = [float(h / t) if t > 0 else None for h, t in zip(hits, totals)]
    present = [a for a in per_class if a is not None]
    report: dict[str, Any] = {
        "acc": sum(present) / len(present),
        "acc_top1": float(correct.mean()),
        "per_class": per_class,
    }
    for name, classes in class_groups(train_class_counts).items():
        values = [a for a in (per_class[c] for c in classes) if a is not None]
        report[f"acc_{name}"] = sum(values) / len(values) if values else None
    return report


# A test set whose class counts differ by more than this fraction of the largest is reported as imbalanced.
IMBALANCE_TOLERANCE = 0.05


def imbalance_warning(labels: torch.Tensor, class_names: Sequence[str]) -> str | None:
    """A one-line warning naming the smallest and largest classes when the test set's class counts differ
    by more than :data:`IMBALANCE_TOLERANCE` of the largest (classes absent from it included), else None."""
    counts = torch.bincount(labels, minlength=len(class_names)).tolist()
    low, high = min(range(len(counts)), key=counts.__getitem__), max(range(len(counts)), key=counts.__getitem__)
    if counts[high] - counts[low] <= IMBALANCE_TOLERANCE * counts[high]:
        return None
    return (
        f"the test set is imbalanced: {counts[low]} images of class {low} ({class_names[low]}) against "
        f"{counts[high]} of class {high} ({class_names[high]}); acc is the balanced accuracy (the mean of "
        f"the per-class accuracies over the {sum(c > 0 for c in counts)} classes present), acc_top1 the "
        f"plain top-1 accuracy"
    )


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = normalize(images[start : start + batch_size].to(device), mean, std)
        out.append(model(x).argmax(dim=1).cpu())
    model.train(was_training)
    return torch.cat(out)


def evaluate_model(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    train_class_counts: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 500,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    predictions = predict(model, images, mean, std, batch_size, device)
    return accuracy_report(predictions, labels, num_classes, train_class_counts)


def evaluate_on_test_set(
    data: ClientData, model: nn.Module, batch_size: int, device: torch.device | str
) -> dict[str, Any]:
    """:func:`evaluate_model` on ``data``'s test set (a ClientData), with its class counts and normalisation."""
    images, labels = data.test_set()
    return evaluate_model(
        model,
        images,
        labels,
        num_classes=data.num_classes,
        train_class_counts=data.train_class_counts(),
        mean=data.mean,
        std=data.std,
        batch_size=batch_size,
        device=device,
    )


def evaluate_on_val_set(
    data: ClientData, model: nn.Module, batch_size: int, device: torch.device | str
) -> dict[str, Any]:
    """``val_acc`` (balanced), ``val_acc_top1`` and ``val_acc_many`` / ``_medium`` / ``_few`` of ``model`` on
    ``data``'s validation split (``data.val_per_class``); ``{}`` when the data have none."""
    images, labels = data.val_set()
    if not len(labels):
        return {}
    report = evaluate_model(
        model,
        images,
        labels,
        num_classes=data.num_classes,
        train_class_counts=data.train_class_counts(),
        mean=data.mean,
        std=data.std,
        batch_size=batch_size,
        device=device,
    )
    return {f"val_{key}": report[key] for key in ACCURACY_KEYS}  # per_class stays the test set's


def evaluate_on_splits(
    data: ClientData, model: nn.Module, batch_size: int, device: torch.device | str
) -> dict[str, Any]:
    """:func:`evaluate_on_test_set`'s report (``acc``, ``acc_top1``, ``per_class``, groups) with
    :func:`evaluate_on_val_set`'s keys beside it: what every evaluation of a run records."""
    return {
        **evaluate_on_test_set(data, model, batch_size, device),
        **evaluate_on_val_set(data, model, batch_size, device),
    }
