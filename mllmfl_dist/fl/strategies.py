"""Strategies as a handful of hooks around one round loop (Flower-style).

- ``client_loss``: the local objective (FedProx adds its proximal term here);
- ``server_step``: turns the clients' weighted mean into the next global model. As in FedOpt /
  pfl-research, the averaged delta ``global - mean`` is treated as a gradient for a server optimizer
  (plain SGD with lr 1 is FedAvg; with momentum, FedAvgM). Buffers such as BatchNorm statistics are not
  optimised: they take the weighted mean directly;
- ``state_dict`` / ``load_state_dict``: the server optimizer state, for checkpoints.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mllmfl_dist.config import FederatedConfig


class Strategy:
    name = "base"

    def __init__(self, cfg: FederatedConfig, server_momentum: float = 0.0):
        self.server_lr = cfg.server_lr
        self.server_momentum = server_momentum
        self._weights: torch.Tensor | None = None
        self._optimizer: torch.optim.SGD | None = None
        self._pending_state: dict[str, Any] | None = None

    # -- client side -------------------------------------------------------------------------------
    def client_loss(self, model: nn.Module, logits: torch.Tensor, labels: torch.Tensor,
                    global_params: Sequence[torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, labels)

    @property
    def needs_global_params(self) -> bool:
        """Whether ``client_loss`` reads the round's global parameters (saves a copy when not)."""
        return False

    # -- server side -------------------------------------------------------------------------------
    def server_step(self, global_flat: torch.Tensor, mean_flat: torch.Tensor,
                    trainable_mask: torch.Tensor) -> torch.Tensor:
        """Next global model (float64 flat) from the current one and the clients' weighted mean."""
        current = global_flat[trainable_mask]
        if self._optimizer is None:
            self._weights = current.clone().requires_grad_(False)
            self._optimizer = torch.optim.SGD(
                [self._weights], lr=self.server_lr, momentum=self.server_momentum
            )
            if self._pending_state is not None:
                self._optimizer.load_state_dict(self._pending_state)
                self._pending_state = None
        # The global model may have moved since the last step (alignment, a resume): follow it.
        self._weights.copy_(current)
        self._weights.grad = current - mean_flat[trainable_mask]
        self._optimizer.step()
        new = mean_flat.clone()
        new[trainable_mask] = self._weights
        return new

    def state_dict(self) -> dict[str, Any]:
        """A copy (the optimizer's own dict shares its momentum tensors, which later steps mutate)."""
        if self._optimizer is None:
            return copy.deepcopy(self._pending_state or {})
        return copy.deepcopy(self._optimizer.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self._optimizer is None:
            self._pending_state = state
        else:
            self._optimizer.load_state_dict(state)


class FedAvg(Strategy):
    name = "fedavg"


class FedAvgM(Strategy):
    """FedAvg with server momentum (Hsu et al., 2019)."""

    name = "fedavgm"

    def __init__(self, cfg: FederatedConfig):
        super().__init__(cfg, server_momentum=cfg.server_momentum)


class FedProx(Strategy):
    """FedAvg with the proximal term ``mu / 2 * ||w - w_global||^2`` on the client (Li et al., 2020)."""

    name = "fedprox"

    def __init__(self, cfg: FederatedConfig):
        super().__init__(cfg)
        self.mu = cfg.prox_mu

    @property
    def needs_global_params(self) -> bool:
        return True

    def client_loss(self, model, logits, labels, global_params):
        loss = nn.functional.cross_entropy(logits, labels)
        if self.mu == 0:
            return loss
        params = [p for p in model.parameters() if p.requires_grad]
        proximal = sum((p - g).pow(2).sum() for p, g in zip(params, global_params))
        return loss + 0.5 * self.mu * proximal


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, FedAvgM, FedProx)}


def build_strategy(cfg: FederatedConfig) -> Strategy:
    return STRATEGIES[cfg.strategy](cfg)
