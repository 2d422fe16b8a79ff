"""How good and how confident a teacher's class distributions are, logged once per run, so an over-confident
(near one-hot) or wrong teacher is visible beside the results it shaped."""

from __future__ import annotations

import math
from typing import Any

import torch


def teacher_diagnostics(q: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
    """Summary numbers of the teacher distributions ``q`` (``[N, C]``, rows summing to 1, e.g.
    ``softmax(logits / T)`` at the temperature the loss uses).

    Returns ``samples`` (N); ``accuracy``, the fraction of rows whose argmax is ``labels`` (``[N]`` int; None
    without labels); ``mean_entropy_nats``, the mean of ``-sum_c q_c ln q_c`` (0 for one-hot rows, ``ln C`` for
    uniform ones, reported as ``max_entropy_nats``); ``mean_top_probability``, the mean of ``max_c q_c``.
    Raises ValueError for an empty ``q`` or labels of another length."""
    if q.ndim != 2 or q.shape[0] == 0:
        raise ValueError(f"q must be a non-empty [N, C] tensor, got shape {tuple(q.shape)}")
    q = q.detach().double()
    accuracy = None
    if labels is not None:
        if labels.shape != (q.shape[0],):
            raise ValueError(f"labels have shape {tuple(labels.shape)}, q has {q.shape[0]} rows")
        accuracy = float((q.argmax(dim=1) == labels.to(q.device)).double().mean())
    return {
        "samples": int(q.shape[0]),
        "accuracy": accuracy,
        "mean_entropy_nats": float(torch.special.entr(q).sum(dim=1).mean()),
        "max_entropy_nats": math.log(q.shape[1]),
        "mean_top_probability": float(q.max(dim=1).values.mean()),
    }
