"""Classifier re-training with federated features (CReFF, Shang et al., IJCAI 2022): the maths.

Pure functions on tensors, no process groups:

- ``linear_ce_gradients``: the gradient of the mean cross-entropy of a linear classifier ``[W | b]`` with
  respect to ``[W | b]``, for each class's batch of features. Closed form,
  ``(softmax(F W^T + b) - onehot)^T [F | 1] / m``, which autograd can differentiate once more with respect
  to the features (the server's gradient matching needs exactly that);
- ``pick_class_batches`` / ``class_gradient_sums``: what one client adds to the round's flat all_reduce:
  per class it holds, ``w_c * g_c`` and ``w_c`` (``g_c`` averaged over a few batches of that class, the
  backbone frozen; ``w_c`` 1, so that the server takes the plain mean over the clients holding the class
  as the released code does, or the client's count ``n_c`` of the class);
- ``gradient_distance``: CReFF's matching distance, the sum over the output rows of the weight gradient
  of ``1 - cos``, plus ``1 - cos`` between the bias gradients (one more row, as in the released code);
- ``match_federated_features``: steps of the server's feature optimizer on the matching loss (plus an
  optional extra term: CLIP2FL's contrast to the CLIP text embeddings, ``text_contrast_loss``);
- ``retrain_classifier``: a fresh linear classifier trained on the federated features.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# Added to the norms of the cosine, as in the dataset-condensation code CReFF builds on.
COSINE_EPS = 1e-6


def linear_ce_gradients(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, classes: torch.Tensor | None = None
) -> torch.Tensor:
    """``[K, C, D + 1]``: for each group k, d mean-CE / d [W | b] over ``features[k]``, all labeled
    ``classes[k]`` (default: k, one group per class).

    features: ``[K, m, D]`` (m features per group); weight ``[C, D]``; bias ``[C]``.
    """
    groups, m, _ = features.shape
    num_classes = weight.shape[0]
    if classes is None:
        classes = torch.arange(groups)
    probs = torch.softmax(features @ weight.T + bias, dim=-1)  # [K, m, C]
    onehot = nn.functional.one_hot(classes.to(probs.device), num_classes).to(probs.dtype)
    residual = probs - onehot[:, None, :]
    grad_w = torch.einsum("cmk,cmd->ckd", residual, features) / m
    grad_b = residual.sum(dim=1) / m
    return torch.cat([grad_w, grad_b[..., None]], dim=-1)


def _one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    distance: torch.Tensor = 1 - (a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1) + COSINE_EPS)
    return distance


def gradient_distance(real: torch.Tensor, synthetic: torch.Tensor) -> torch.Tensor:
    """Distance between classifier gradients ``[..., C, D + 1]`` (``[dW | db]``): the sum over the C output
    rows of ``1 - cos(dW_real_i, dW_syn_i)`` plus ``1 - cos(db_real, db_syn)``; leading dimensions (classes)
    are summed too."""
    rows = _one_minus_cos(real[..., :-1], synthetic[..., :-1]).sum()
    return rows + _one_minus_cos(real[..., -1], synthetic[..., -1]).sum()


def pick_class_batches(
    labels: torch.Tensor, num_classes: int, *, batch_size: int, batches: int, generator: torch.Generator
) -> list[tuple[int, torch.Tensor]]:
    """For each class a client holds, ``batches`` random batches of up to ``batch_size`` of its sample
    positions: ``[(class, positions), ...]``, drawn from ``generator`` only."""
    picked = []
    labels = labels.cpu()
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        if len(members) == 0:
            continue
        for _ in range(batches):
            picked.append((c, members[torch.randperm(len(members), generator=generator)[:batch_size]]))
    return picked


@torch.no_grad()
def class_gradient_sums(
    batches: list[tuple[int, torch.Tensor]], weights: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """One client's contribution to the round's sum: ``[C, C, D + 1]`` float64 holding ``w_c * g_c`` for
    each class c it holds, ``g_c`` the classifier gradient averaged over that class's batches of features
    (``(class, features [m, D])``, taken under the frozen global backbone). Summed over clients and divided
    by the summed ``weights``, it is the ``w``-weighted mean over clients of each class's gradient."""
    num_classes = weight.shape[0]
    sums = torch.zeros(num_classes, num_classes, weight.shape[1] + 1, dtype=torch.float64)
    per_class = torch.zeros(num_classes, dtype=torch.float64)
    for c, features in batches:
        grad = linear_ce_gradients(features[None].float(), weight.float(), bias.float(), torch.tensor([c]))[0]
        sums[c] += grad.double().cpu()
        per_class[c] += 1
    held = per_class > 0
    sums[held] *= (weights.double().cpu()[held] / per_class[held])[:, None, None]
    return sums


def mean_class_gradients(sums: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Aggregated per-class gradients ``[C, C, D + 1]`` (float32) and the mask of classes any client held."""
    present = weights > 0
    means = torch.zeros_like(sums)
    means[present] = sums[present] / weights[present, None, None]
    return means.float(), present


def match_federated_features(
    features: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    real: torch.Tensor,
    present: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    steps: int,
    extra_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """``steps`` optimizer steps on ``features`` ``[C, m, D]`` (a leaf the optimizer owns) so that the
    gradients they produce under the frozen classifier ``(weight, bias)`` match ``real`` on the classes
    present; returns the last loss. ``extra_loss(features)`` is added when given (CLIP2FL's contrast)."""
    weight, bias = weight.detach().float(), bias.detach().float()
    loss = torch.zeros(())
    classes = torch.nonzero(present).flatten()
    for _ in range(steps):
        synthetic = linear_ce_gradients(features, weight, bias)
        loss = gradient_distance(real[classes], synthetic[classes])
        if extra_loss is not None:
            loss = loss + extra_loss(features)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def text_contrast_loss(features: torch.Tensor, text_embeddings: torch.Tensor, temperature: float) -> torch.Tensor:
    """CLIP2FL's supervised contrast of the federated features ``[C, m, D]`` to the class text embeddings
    ``[C, D]`` (L2-normalised; the features are not), in closed form.

    The released loss scores every feature i against the text embedding of every other feature j's class,
    ``s_ij = f_i . t_{y_j} / temperature``, with positives the j != i of i's class, and averages
    ``-log(exp(s_ij) / sum_{k != i} exp(s_ik))`` over them. With m features per class the positives all
    share ``t_{y_i}`` and the denominator counts m copies of each other class and m - 1 of i's own, so the
    loss is ``-s_{i, y_i} + log sum_c w_c exp(s_{i,c})`` with ``w_c = m`` (``m - 1`` for c = y_i), averaged
    over the features: O(N C) instead of the N x N matrix.
    """
    num_classes, m, _ = features.shape
    if m < 2:
        raise ValueError("the contrast needs at least 2 features per class (a positive besides the anchor)")
    scores = features @ text_embeddings.T / temperature  # [C, m, C]
    counts = torch.full((num_classes, num_classes), float(m), device=features.device)
    counts.fill_diagonal_(m - 1)
    positive = scores.diagonal(dim1=0, dim2=2).T  # [C, m]: s_{i, y_i}
    return (torch.logsumexp(scores + counts.log()[:, None, :], dim=-1) - positive).mean()


@torch.no_grad()
def retrain_classifier(
    features: torch.Tensor, *, epochs: int, lr: float, batch_size: int, generator: torch.Generator
) -> nn.Linear:
    """A fresh ``nn.Linear(D, C)`` trained by plain SGD for ``epochs`` passes over the federated features
    ``[C, m, D]`` (labels: their class), in random batches of ``batch_size``; initial weights and order
    come from ``generator`` only. The steps use the closed-form cross-entropy gradient of a linear layer
    (the same numbers autograd gives, at a fraction of the per-step overhead: thousands of tiny steps)."""
    num_classes, m, dim = features.shape
    x = features.detach().float().reshape(num_classes * m, dim)
    y = torch.arange(num_classes, device=x.device).repeat_interleave(m)
    onehot = nn.functional.one_hot(y, num_classes).float()
    bound = 1.0 / dim**0.5  # nn.Linear's default init, drawn from the generator
    weight = torch.empty(num_classes, dim).uniform_(-bound, bound, generator=generator).to(x.device)
    bias = torch.empty(num_classes).uniform_(-bound, bound, generator=generator).to(x.device)
    n = x.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(x.device)
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            xb = x[batch]
            residual = torch.softmax(torch.addmm(bias, xb, weight.T), dim=1).sub_(onehot[batch])
            residual.div_(len(batch))
            weight.sub_(residual.T @ xb, alpha=lr)
            bias.sub_(residual.sum(dim=0), alpha=lr)
    head = nn.Linear(dim, num_classes).to(x.device)
    head.weight.copy_(weight)
    head.bias.copy_(bias)
    return head.eval()
