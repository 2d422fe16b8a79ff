"""The FedAvg family: FedAvg, FedAvgM (server momentum) and FedProx (a proximal term on the client).

As in FedOpt / pfl-research, the server treats the averaged delta ``global - mean`` as the gradient of a
server optimizer over the trainable parameters: plain SGD with lr 1 is FedAvg, with momentum FedAvgM
(``federated.server_lr`` scales every strategy's step). Buffers such as BatchNorm statistics are not
optimised: they take the clients' weighted mean directly.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from mllmfl_dist.fl.strategies.base import Strategy, StrategyArgs


class ServerOptimizer(Protocol):
    """What FedAvg's server step needs of its optimizer: :class:`ServerSGD` here, FedOpt's adaptive ones
    (:mod:`mllmfl_dist.fl.server_optimizers`) in its subclasses."""

    lr: float

    def step(self, current: torch.Tensor, client_mean: torch.Tensor, trainable_mask: torch.Tensor) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ServerSGD:
    """SGD (with optional momentum) on the global model's trainable entries, stepping along ``global - mean``;
    its state (the momentum buffer) is what a checkpoint keeps."""

    def __init__(self, lr: float, momentum: float = 0.0):
        self.lr, self.momentum = lr, momentum
        self._weights: torch.Tensor | None = None
        self._optimizer: torch.optim.SGD | None = None
        self._pending_state: dict[str, Any] | None = None

    def step(self, current: torch.Tensor, client_mean: torch.Tensor, trainable_mask: torch.Tensor) -> torch.Tensor:
        weights = current[trainable_mask]
        if self._optimizer is None:
            self._weights = weights.clone().requires_grad_(False)
            self._optimizer = torch.optim.SGD([self._weights], lr=self.lr, momentum=self.momentum)
            if self._pending_state is not None:
                self._optimizer.load_state_dict(self._pending_state)
                self._pending_state = None
        assert self._weights is not None  # set with the optimizer, above or at an earlier step
        # The global model may have moved since the last step (alignment, a resume): follow it.
        self._weights.copy_(weights)
        self._weights.grad = weights - client_mean[trainable_mask]
        self._optimizer.step()
        new = client_mean.clone()
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
    """Federated averaging (McMahan et al., 2017), with the server step as a server optimizer."""

    name = "fedavg"
    dp_compatible = True  # its server step sees only the clients' (clipped, noised) mean
    vectorizable = True  # local training is cross-entropy alone

    def __init__(self, args: StrategyArgs, server_momentum: float = 0.0):
        super().__init__(args)
        self.server: ServerOptimizer = ServerSGD(args.federated.server_lr, server_momentum)

    def update_global_model(
        self, current: torch.Tensor, client_mean: torch.Tensor, trainable_mask: torch.Tensor
    ) -> torch.Tensor:
        return self.server.step(current, client_mean, trainable_mask)

    def divergence_hints(self, where: str) -> list[str]:
        if where != "global_update":
            return []
        return [
            f"federated.server_lr = {self.server.lr:g}",
            f"federated.server_momentum = {self.args.federated.server_momentum:g}",
        ]

    def state_dict(self) -> dict[str, Any]:
        return self.server.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.server.load_state_dict(state)


class FedAvgM(FedAvg):
    """FedAvg with server momentum ``federated.server_momentum`` (Hsu et al., 2019)."""

    name = "fedavgm"

    def __init__(self, args: StrategyArgs):
        super().__init__(args, server_momentum=args.federated.server_momentum)


class FedProx(FedAvg):
    """FedAvg with the proximal term ``mu / 2 * ||w - w_global||^2`` on the client (Li et al., 2020),
    ``mu = federated.prox_mu``."""

    name = "fedprox"
    reads_global_params = True
    vectorizable = True  # cross-entropy plus local_penalty, the same proximal term

    def __init__(self, args: StrategyArgs):
        super().__init__(args)
        self.mu = args.federated.prox_mu

    def local_loss(
        self,
        model: nn.Module,
        logits: torch.Tensor,
        labels: torch.Tensor,
        global_params: Sequence[torch.Tensor],
        inputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        loss = nn.functional.cross_entropy(logits, labels)
        if self.mu == 0:
            return loss
        params = [p for p in model.parameters() if p.requires_grad]
        proximal = sum((p - g).pow(2).sum() for p, g in zip(params, global_params))
        return loss + 0.5 * self.mu * proximal

    def local_penalty(self, params: dict[str, torch.Tensor], global_params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``mu / 2 * ||w_k - w_global||^2`` for each of the stacked clients k: [g]."""
        proximal = sum((p - global_params[n]).pow(2).flatten(1).sum(1) for n, p in params.items())
        return 0.5 * self.mu * torch.as_tensor(proximal)

    def divergence_hints(self, where: str) -> list[str]:
        if where == "clients":
            return [f"federated.prox_mu = {self.mu:g}"]
        return super().divergence_hints(where)
