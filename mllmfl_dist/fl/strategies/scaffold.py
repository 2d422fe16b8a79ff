"""SCAFFOLD: stochastic controlled averaging (Karimireddy et al., ICML 2020), option II control variates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mllmfl_dist.fl.client import normalizing_weight
from mllmfl_dist.fl.strategies.base import ClientContext, ClientUpdate, Shapes, StrategyArgs, Tensors
from mllmfl_dist.fl.strategies.fedavg import FedAvg


def trainable_numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def split_like_parameters(flat: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    """A flat vector over the trainable parameters (in ``model.parameters()`` order, the order of the trainer's
    ``trainable_mask``) as one tensor per parameter, of its shape, dtype and device."""
    params = [p for p in model.parameters() if p.requires_grad]
    pieces = torch.split(flat, [p.numel() for p in params])
    return [piece.reshape(p.shape).to(p.device, p.dtype) for piece, p in zip(pieces, params)]


class Scaffold(FedAvg):
    """SCAFFOLD (Algorithm 1 of the paper, option II), over the trainable parameters.

    Every client ``i`` keeps its control variate ``c_i`` (per-client state, zeros before its first round); the
    server keeps ``c`` (broadcast every round). Local SGD steps along ``g(y) + c - c_i`` (the loss gets the term
    ``<c - c_i, y>``, whose gradient is that correction, so local momentum and weight decay apply to it as to the
    gradient). After ``K`` local steps of learning rate ``eta`` (``federated.lr``) and momentum ``rho``
    (``federated.momentum``):

    - ``c_i+ = c_i - c + (x - y_i) / (||a||_1 eta)`` (option II), uploaded as ``delta_c_i = c_i+ - c_i``, with
      ``||a||_1`` the summed weight of the steps' gradients in ``x - y_i``
      (:func:`mllmfl_dist.fl.client.normalizing_weight`; ``K`` without momentum, the paper's case). So ``c_i+``
      is exactly the weighted mean of the gradients taken, the constant correction cancelling, as option II
      intends; dividing by ``K`` under momentum would leave a share of ``c - c_i`` in it. Weight decay ``lambda``
      adds ``lambda y`` to each gradient: ``c_i+`` then estimates the gradient of the regularised local loss,
      the objective local SGD minimises, with the same normalisation;
    - the server: ``x <- x + eta_g (mean_i y_i - x)`` (``eta_g = federated.server_lr``, default 1; the mean is the
      trainer's, weighted by sample counts, where the paper weighs clients equally) and
      ``c <- c + (1 / N) sum_i delta_c_i`` (``N = federated.num_clients``).

    A client that takes no step (``K = 0``: one sample) keeps ``c_i`` and uploads no delta. Buffers (BatchNorm
    statistics) take the weighted mean, as in FedAvg.
    """

    name = "scaffold"
    dp_compatible = False  # the control deltas are uploads DP-FedAvg's clipping does not cover

    def __init__(self, args: StrategyArgs):
        super().__init__(args)
        self.control: torch.Tensor | None = None  # c, float32, the same on every rank after each broadcast
        self._correction: list[torch.Tensor] = []  # c - c_i of the client being trained, per parameter

    def _ensure_control(self, model: nn.Module) -> torch.Tensor:
        if self.control is None:
            self.control = torch.zeros(trainable_numel(model))
        return self.control

    # -- on a client host ------------------------------------------------------------------------------------
    def upload_shapes(self, model: nn.Module) -> Shapes:
        return {"delta_control": (trainable_numel(model),)}

    def client_state_shapes(self, model: nn.Module) -> Shapes:
        return {"control": (trainable_numel(model),)}

    def start_client(self, model: nn.Module, client: ClientContext) -> None:
        c = self._ensure_control(model).double()
        if client.state is not None:
            c = c - client.state["control"].double().cpu()
        self._correction = split_like_parameters(c, model)

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
        return loss + sum((p * d).sum() for p, d in zip(params, self._correction))

    def finish_client(
        self,
        model: nn.Module,
        client: ClientContext,
        start: torch.Tensor,
        trained: torch.Tensor,
        trainable_mask: torch.Tensor,
    ) -> ClientUpdate:
        c = self._ensure_control(model).double().to(start.device)
        c_i = client.state["control"].double().to(start.device) if client.state is not None else torch.zeros_like(c)
        if client.local_steps == 0:
            return ClientUpdate({}, {"control": c_i})
        delta_model = (start - trained)[trainable_mask]
        steps = normalizing_weight(client.local_steps, self.args.federated.momentum)
        new_c_i = c_i - c + delta_model / (steps * self.args.federated.lr)
        return ClientUpdate({"delta_control": new_c_i - c_i}, {"control": new_c_i})

    # -- on the server ---------------------------------------------------------------------------------------
    def process_uploads(self, model: nn.Module, sums: Tensors, round_index: int) -> dict[str, float]:
        c = self._ensure_control(model).double()
        c = c + sums["delta_control"].double().cpu() / self.args.federated.num_clients
        self.control = c.float()
        return {"control_norm": float(c.norm())}

    # -- with the broadcast ----------------------------------------------------------------------------------
    def broadcast_state(self, model: nn.Module) -> Tensors:
        return {"control": self._ensure_control(model)}

    def receive_state(self, tensors: Tensors) -> None:
        self.control = tensors["control"].detach().cpu().float().clone()

    # -- checkpoints -----------------------------------------------------------------------------------------
    def divergence_hints(self, where: str) -> list[str]:
        if where == "clients":
            return [f"federated.local_epochs = {self.args.federated.local_epochs}"]
        return super().divergence_hints(where)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": super().state_dict(), "control": None if self.control is None else self.control.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        super().load_state_dict(state["optimizer"])
        self.control = None if state["control"] is None else state["control"].clone()
