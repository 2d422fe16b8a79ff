"""FedNova: normalised averaging (Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization", NeurIPS 2020)."""

from __future__ import annotations

import torch
from torch import nn

from mllmfl_dist.fl.client import normalizing_weight
from mllmfl_dist.fl.strategies.base import ClientContext, ClientUpdate, Shapes, Strategy, Tensors
from mllmfl_dist.fl.strategies.scaffold import trainable_numel


class FedNova(Strategy):
    """FedNova over the trainable parameters, with local momentum ``rho = federated.momentum`` handled as in the
    paper (``||a_i||_1`` of :func:`normalizing_weight`).

    Client ``i`` (``n_i`` samples, ``tau_i`` local steps) uploads ``n_i (x - y_i) / ||a_i||_1`` (its normalised
    update), ``n_i ||a_i||_1`` and ``n_i``; the server, with ``p_i = n_i / sum n``, steps
    ``x <- x - eta_g tau_eff sum_i p_i (x - y_i) / ||a_i||_1`` with ``tau_eff = sum_i p_i ||a_i||_1`` and
    ``eta_g = federated.server_lr``. With equal step counts and no momentum this is FedAvg. A client that takes
    no step (one sample) adds nothing but its weight. Buffers (BatchNorm statistics) take the weighted mean.
    """

    name = "fednova"
    dp_compatible = False  # the step counts are uploads DP-FedAvg's clipping does not cover

    def upload_shapes(self, model: nn.Module) -> Shapes:
        return {"normalized_update": (trainable_numel(model),), "tau": (1,), "weight": (1,)}

    def finish_client(
        self,
        model: nn.Module,
        client: ClientContext,
        start: torch.Tensor,
        trained: torch.Tensor,
        trainable_mask: torch.Tensor,
    ) -> ClientUpdate:
        n = float(client.num_samples)
        weight = torch.full((1,), n, dtype=torch.float64)
        if client.local_steps == 0:
            return ClientUpdate({"weight": weight})
        a = normalizing_weight(client.local_steps, self.args.federated.momentum)
        return ClientUpdate(
            {
                "normalized_update": (start - trained)[trainable_mask] * (n / a),
                "tau": torch.full((1,), n * a, dtype=torch.float64),
                "weight": weight,
            }
        )

    def server_update(
        self, current: torch.Tensor, client_mean: torch.Tensor, trainable_mask: torch.Tensor, sums: Tensors
    ) -> torch.Tensor:
        total = float(sums["weight"][0])
        tau_eff = float(sums["tau"][0]) / total
        direction = sums["normalized_update"].to(current.device) / total
        new = client_mean.clone()
        new[trainable_mask] = current[trainable_mask] - self.args.federated.server_lr * tau_eff * direction
        return new

    def divergence_hints(self, where: str) -> list[str]:
        if where == "global_update":
            return [f"federated.server_lr = {self.args.federated.server_lr:g}"]
        return []
