"""Where a federated round went non-finite, and the one line that says so (:mod:`mllmfl_dist.fl.trainer`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mllmfl_dist.config import FederatedConfig
    from mllmfl_dist.fl.strategies import Strategy

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


def round_divergence(
    round_index: int,
    where: str,
    fed: FederatedConfig,
    strategy: Strategy,
    server_hook_hints: Sequence[str],
    clients: Sequence[int] = (),
) -> str:
    """The line for a round that went non-finite ``where`` ("clients": the local training of ``clients``, or one
    of the DIVERGED_IN_* places), with the settings to look at."""
    if where == "clients":
        what = f"the local training of client(s) {', '.join(map(str, clients))} went non-finite (NaN or inf weights)"
        hints = [
            f"federated.lr = {fed.lr:g}",
            f"federated.momentum = {fed.momentum:g}",
            f"federated.weight_decay = {fed.weight_decay:g}",
            f"federated.batch_size = {fed.batch_size}",
            *strategy.divergence_hints("clients"),
        ]
    elif where == DIVERGED_IN_GLOBAL_UPDATE:
        what = "the server step made the global model non-finite"
        hints = strategy.divergence_hints("global_update")
    elif where == DIVERGED_IN_UPLOADS:
        what = f"{strategy.name}'s server-side use of the clients' uploads went non-finite"
        hints = strategy.divergence_hints("uploads")
    else:
        what = "global alignment made the model non-finite"
        hints = list(server_hook_hints)
    return divergence_message(round_index, what, hints)
