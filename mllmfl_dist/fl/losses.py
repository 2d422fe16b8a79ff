"""Losses shared by the client objectives and the server's alignment."""

from __future__ import annotations

import torch
from torch import nn


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None, weight: float,
                      temperature: float) -> torch.Tensor:
    """``CE(y, p) + weight * T^2 * KL(q || softmax(logits / T))`` with ``q`` the teacher's class distribution
    (rows summing to 1); just the cross-entropy without a teacher or with weight 0."""
    loss = nn.functional.cross_entropy(logits, labels)
    if teacher is not None and weight > 0:
        log_p = nn.functional.log_softmax(logits / temperature, dim=1)
        loss = loss + weight * temperature**2 * nn.functional.kl_div(log_p, teacher, reduction="batchmean")
    return loss
