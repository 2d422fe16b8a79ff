"""Losses shared by the client objectives and the server's alignment."""

from __future__ import annotations

import torch
from torch import nn


def distillation_loss(
    logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None, weight: float, temperature: float
) -> torch.Tensor:
    """``CE(y, p) + weight * T^2 * KL(q_T || softmax(logits / T))``, the standard distillation loss (Hinton et
    al., 2015), with ``q_T`` the teacher's distribution *already tempered* (rows summing to 1; e.g.
    ``softmax(teacher_logits / T)``); just the cross-entropy without a teacher or with weight 0.

    logits ``[B, C]``, labels ``[B]`` int64, teacher ``[B, C]`` or None; returns a scalar (mean over B).
    """
    loss = nn.functional.cross_entropy(logits, labels)
    if teacher is not None and weight > 0:
        log_p = nn.functional.log_softmax(logits / temperature, dim=1)
        loss = loss + weight * temperature**2 * nn.functional.kl_div(log_p, teacher, reduction="batchmean")
    return loss


def temper(q: torch.Tensor, temperature: float) -> torch.Tensor:
    """``q_T proportional to q^(1/T)`` row-wise (``softmax(log q / T)``): a class distribution ``[B, C]``
    softened (T > 1) or sharpened (T < 1) as its logits would be; T = 1 returns ``q`` unchanged."""
    if temperature == 1:
        return q
    return torch.softmax(torch.log(q) / temperature, dim=1)
