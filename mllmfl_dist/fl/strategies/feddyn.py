"""FedDyn: federated learning with dynamic regularisation (Acar et al., ICLR 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mllmfl_dist.config import ConfigError
from mllmfl_dist.config.strategy_sections import FedDynConfig
from mllmfl_dist.fl.strategies.base import ClientContext, ClientUpdate, Shapes, Strategy, StrategyArgs, Tensors
from mllmfl_dist.fl.strategies.scaffold import split_like_parameters, trainable_numel

if TYPE_CHECKING:
    from mllmfl_dist.config import Config


class FedDyn(Strategy):
    """FedDyn (Algorithm 1 of the paper), over the trainable parameters; ``alpha = feddyn.alpha``.

    Client ``k`` keeps ``grad_k`` (its state: the gradient of its loss at its last local model, zeros before its
    first round) and minimises ``L_k(theta) - <grad_k, theta> + alpha / 2 ||theta - theta^{t-1}||^2`` from the
    global ``theta^{t-1}``; then ``grad_k <- grad_k - alpha (theta_k - theta^{t-1})``. It uploads
    ``theta_k - theta^{t-1}`` and a count of 1. The server (``m = federated.num_clients``, ``P`` the round's
    clients): ``h <- h - alpha / m * sum_P (theta_k - theta^{t-1})`` and
    ``theta^t = theta^{t-1} + mean_P (theta_k - theta^{t-1}) - h / alpha``, the mean unweighted as in the paper.
    Buffers (BatchNorm statistics) take the trainer's sample-weighted mean. The server step is the paper's, so
    ``federated.server_lr`` must stay 1.
    """

    name = "feddyn"
    # Its server step sums the clients' raw deltas (and keeps their per-client gradients): unclipped, no noise.
    dp_compatible = False
    sections = {"feddyn": FedDynConfig}
    reads_global_params = True

    def __init__(self, args: StrategyArgs, feddyn: FedDynConfig):
        super().__init__(args)
        self.alpha = feddyn.alpha
        self.h: torch.Tensor | None = None  # rank 0's server state, float64 over the trainable entries
        self._grad: list[torch.Tensor] = []  # grad_k of the client being trained, per parameter

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.federated.server_lr != 1.0:
            raise ConfigError(
                f"federated.strategy = 'feddyn' takes the paper's server step; federated.server_lr "
                f"= {cfg.federated.server_lr:g} would change it (leave it at 1)"
            )

    def upload_shapes(self, model: nn.Module) -> Shapes:
        return {"delta_sum": (trainable_numel(model),), "clients": (1,)}

    def client_state_shapes(self, model: nn.Module) -> Shapes:
        return {"gradient": (trainable_numel(model),)}

    def start_client(self, model: nn.Module, client: ClientContext) -> None:
        self._grad = (
            [] if client.state is None else split_like_parameters(client.state["gradient"].double().cpu(), model)
        )

    def local_loss(
        self,
        model: nn.Module,
        logits: torch.Tensor,
        labels: torch.Tensor,
        global_params: Sequence[torch.Tensor],
        inputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        loss = nn.functional.cross_entropy(logits, labels)
        params = [p for p in model.parameters() if p.requires_grad]
        if self._grad:
            loss = loss - sum((p * g).sum() for p, g in zip(params, self._grad))
        return loss + 0.5 * self.alpha * sum((p - g).pow(2).sum() for p, g in zip(params, global_params))

    def finish_client(
        self,
        model: nn.Module,
        client: ClientContext,
        start: torch.Tensor,
        trained: torch.Tensor,
        trainable_mask: torch.Tensor,
    ) -> ClientUpdate:
        delta = (trained - start)[trainable_mask]
        grad = (
            client.state["gradient"].double().to(delta.device) if client.state is not None else torch.zeros_like(delta)
        )
        return ClientUpdate(
            {"delta_sum": delta, "clients": torch.ones(1, dtype=torch.float64)}, {"gradient": grad - self.alpha * delta}
        )

    def server_update(
        self, current: torch.Tensor, client_mean: torch.Tensor, trainable_mask: torch.Tensor, sums: Tensors
    ) -> torch.Tensor:
        delta_sum, count = sums["delta_sum"].to(current.device), float(sums["clients"][0])
        if self.h is None:
            self.h = torch.zeros_like(delta_sum)
        self.h = self.h.to(current.device) - self.alpha / self.args.federated.num_clients * delta_sum
        new = client_mean.clone()
        new[trainable_mask] = current[trainable_mask] + delta_sum / count - self.h / self.alpha
        return new

    def divergence_hints(self, where: str) -> list[str]:
        return [f"feddyn.alpha = {self.alpha:g}"]

    def state_dict(self) -> dict[str, Any]:
        return {"h": None if self.h is None else self.h.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.h = None if state["h"] is None else state["h"].clone()
