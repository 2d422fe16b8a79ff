"""Linear probe: how linearly separable a frozen backbone's pooled features make the classes.

The standard representation-quality measure (Kornblith et al. 2019, "Do Better ImageNet Models Transfer
Better?"; CLIP's linear-probe protocol, Radford et al. 2021): extract features of a frozen model once, fit an
L2-regularised multinomial logistic regression on a labelled train set, report accuracy on a held-out set.
The recipe here is fixed and never tuned on the test set:

- features: the FL model's globally average-pooled last convolutional map ``[n, map_channels]``, before any
  projection and the classifier (:meth:`FLModel.feature_map`); for an open_clip model, its image tower's
  ``encode_image`` embedding. Images are normalised as the trainer normalises them (the data's mean/std;
  open_clip's own preprocessing for CLIP), no augmentation, batched, no gradients;
- BatchNorm: eval mode with the backbone's own running statistics, for every backbone alike. For a random
  initialisation those are the initial values (mean 0, variance 1), so each BatchNorm layer is the identity
  (up to eps): the random reference is the untrained network exactly as federated finetuning starts from it;
- classifier: features standardised with the train set's mean/std (scikit-learn ``StandardScaler``), then
  ``LogisticRegression(C=1.0, l2, lbfgs, max_iter=1000)``, multinomial; deterministic (lbfgs has no
  randomness);
- scores: balanced accuracy (mean per-class accuracy, ``acc``) and plain top-1 (``acc_top1``) from
  :func:`mllmfl_dist.fl.evaluate.accuracy_report`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from mllmfl_dist.data import ClientData, normalize
from mllmfl_dist.fl.evaluate import accuracy_report
from mllmfl_dist.data.images import to_pil

if TYPE_CHECKING:
    from mllmfl_dist.fl.models import FLModel

PROBE_C = 1.0  # inverse L2 strength of the logistic regression (scikit-learn's default), fixed
PROBE_MAX_ITER = 1000
FEATURE_BATCH = 256
RECIPE = (
    f"logistic regression (scikit-learn lbfgs, L2, C={PROBE_C:g}, max_iter={PROBE_MAX_ITER}) on standardised "
    f"pooled features; BatchNorm in eval mode with the backbone's own running statistics"
)

# uint8 images [n, C, H, W] -> float32 features [n, D]
Featurizer = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ProbeSets:
    """The labelled images of one probe: ``train`` fits the classifier, ``test`` (and ``val`` when it holds
    images) scores it; each is (uint8 ``[n, C, H, W]``, int64 ``[n]``). ``train_class_counts`` are the FL
    training set's (they define Many/Medium/Few in the report)."""

    train_name: str
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor] | None
    num_classes: int
    train_class_counts: list[int]


@torch.no_grad()
def pooled_features(
    model: FLModel,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = FEATURE_BATCH,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """float32 ``[n, map_channels]``: the average-pooled ``model.feature_map`` of uint8 ``images``
    ``[n, C, H, W]`` normalised with ``mean``/``std``, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = normalize(images[start : start + batch_size].to(device), mean, std)
            fmap = model.feature_map(x)
            out.append(torch.flatten(nn.functional.adaptive_avg_pool2d(fmap, 1), 1).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.map_channels)


@torch.no_grad()
def clip_image_features(
    clip: Any, preprocess: Callable[[Any], torch.Tensor], images: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    """float32 ``[n, embed_dim]``: open_clip's ``encode_image`` of uint8 ``images`` ``[n, C, H, W]``, each through
    the model's own preprocessing (grayscale repeated to RGB, resized and normalised as CLIP expects)."""
    param = next(clip.visual.parameters())
    out = []
    for start in range(0, images.shape[0], batch_size):
        batch = [to_pil(im).convert("RGB") for im in images[start : start + batch_size]]
        x = torch.stack([preprocess(im) for im in batch]).to(device=param.device, dtype=param.dtype)
        out.append(clip.encode_image(x).float().cpu())
    return torch.cat(out)


def fit_probe(features: torch.Tensor, labels: torch.Tensor) -> tuple[Any, bool]:
    """The fitted classifier (a scikit-learn pipeline: scaler + logistic regression) and whether lbfgs
    converged within ``PROBE_MAX_ITER``. ``features`` float ``[n, D]``, ``labels`` int64 ``[n]``; raises
    ValueError when the labels hold fewer than two classes."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = labels.numpy()
    if len(np.unique(y)) < 2:
        raise ValueError(f"the probe's train set holds {len(np.unique(y))} class(es); it needs at least two")
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        pipe.fit(features.double().numpy(), y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return pipe, converged


def _score(pipe: Any, features: torch.Tensor, labels: torch.Tensor, sets: ProbeSets) -> dict[str, Any]:
    predictions = torch.from_numpy(pipe.predict(features.double().numpy()).astype(np.int64))
    return accuracy_report(predictions, labels, sets.num_classes, sets.train_class_counts)


def linear_probe(featurize: Featurizer, sets: ProbeSets) -> dict[str, Any]:
    """Fit on ``sets.train``'s features and score: ``acc`` / ``acc_top1`` (balanced / top-1 test accuracy),
    ``acc_many/medium/few`` and ``per_class`` (test), ``val_acc`` / ``val_acc_top1`` when there is a
    validation set, ``train_acc`` (balanced, on the fitted images: how much is fitting rather than
    generalising), ``feature_dim``, ``n_train``, ``n_test``, ``converged``."""
    train_x, test_x = featurize(sets.train[0]), featurize(sets.test[0])
    if not (torch.isfinite(train_x).all() and torch.isfinite(test_x).all()):
        raise ValueError("the backbone's features are not finite")
    pipe, converged = fit_probe(train_x, sets.train[1])
    test = _score(pipe, test_x, sets.test[1], sets)
    result: dict[str, Any] = {"acc": test["acc"], "acc_top1": test["acc_top1"]}
    if sets.val is not None and len(sets.val[1]):
        val = _score(pipe, featurize(sets.val[0]), sets.val[1], sets)
        result.update(val_acc=val["acc"], val_acc_top1=val["acc_top1"])
    result["train_acc"] = _score(pipe, train_x, sets.train[1], sets)["acc"]
    result.update({k: test[k] for k in ("acc_many", "acc_medium", "acc_few", "per_class")})
    result.update(
        feature_dim=int(train_x.shape[1]),
        n_train=int(train_x.shape[0]),
        n_test=int(test_x.shape[0]),
        converged=converged,
    )
    return result


def first_per_class(images: torch.Tensor, labels: torch.Tensor, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` images of each class, in the set's order (a deterministic balanced subset)."""
    rank = torch.zeros_like(labels)
    for cls in labels.unique():
        where = (labels == cls).nonzero().flatten()
        rank[where] = torch.arange(len(where))
    keep = (rank < per_class).nonzero().flatten()
    return images[keep], labels[keep]


def probe_sets(data: ClientData, train_set: str = "holdout", test_per_class: int | None = None) -> ProbeSets:
    """The probe's sets from a :class:`~mllmfl_dist.data.ClientData`: train = the server's class-balanced
    holdout (``holdout``, ``data.server_holdout_per_class`` per class) or every client's images
    (``clients``, long-tailed); test = the balanced test set (its first ``test_per_class`` images of each
    class when given); val = ``data.val_set()`` where the data has one. Raises ValueError (one line) when the
    chosen train set is empty."""
    if train_set == "holdout":
        pool = data.server_pool() if hasattr(data, "server_pool") else None
        if pool is None or not len(pool[1]):
            raise ValueError(
                "the probe trains on the server holdout, which is empty: set "
                "data.server_holdout_per_class > 0 (an array data source)"
            )
        train, name = pool, f"server holdout ({len(pool[1])} images)"
    elif train_set == "clients":
        parts = [data.client(c) for c in range(data.num_clients)]
        train = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        name = f"clients' training images ({len(train[1])}, long-tailed)"
    else:
        raise ValueError(f"unknown probe train set {train_set!r}; choose holdout or clients")
    val_set = getattr(data, "val_set", None)
    val = val_set() if callable(val_set) else None
    test = data.test_set() if test_per_class is None else first_per_class(*data.test_set(), test_per_class)
    return ProbeSets(name, train, test, val, data.num_classes, data.train_class_counts())
