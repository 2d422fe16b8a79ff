"""Where a federated round went non-finite, and the one line that says so (:mod:`mllmfl_dist.fl.trainer`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Where a round went non-finite; the broadcast carries the index, so every rank stops with one message.
DIVERGED_NOWHERE = "nowhere"
DIVERGED_IN_GLOBAL_UPDATE = "global_update"
DIVERGED_IN_UPLOADS = "uploads"
DIVERGED_IN_SERVER_HOOK = "server_hook"
DIVERGENCE_CODES = (DIVERGED_NOWHERE, DIVERGED_IN_GLOBAL_UPDATE, DIVERGED_IN_UPLOADS, DIVERGED_IN_SERVER_HOOK)


def divergence_message(round_index: int, what: str, hints: Sequence[str]) -> str:
    """One line: the round, what went non-finite, and the settings to look at."""
    look = f" Look at {', '.join(hints)}" if hints else ""
    return f"round {round_index}: {what}; nothing of this round was saved and the last checkpoint is kept.{look}"


def model_is_finite(model: torch.nn.Module) -> bool:
    """Whether every floating-point entry of the model's state (parameters and buffers) is finite."""
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


def tensors_are_finite(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether every entry of every tensor is finite."""
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())
