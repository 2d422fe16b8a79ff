"""The FedOpt family: FedAdagrad, FedAdam and FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR
2021): FedAvg's clients, an adaptive server optimizer (:mod:`mllmfl_dist.fl.server_optimizers`) in place of
server SGD, configured by the ``[fedopt]`` section."""

from __future__ import annotations

from typing import ClassVar

from mllmfl_dist.config.strategy_sections import FedOptConfig
from mllmfl_dist.fl.server_optimizers import AdaptiveServerOptimizer
from mllmfl_dist.fl.strategies.base import StrategyArgs
from mllmfl_dist.fl.strategies.fedavg import FedAvg


class FedOpt(FedAvg):
    """FedAvg with an adaptive server step of rule :attr:`rule` at lr ``federated.server_lr * fedopt.eta``; the
    optimizer's moments are the strategy's checkpointed state. Not a strategy of its own: its subclasses are."""

    sections = {"fedopt": FedOptConfig}
    rule: ClassVar[str] = ""

    def __init__(self, args: StrategyArgs, fedopt: FedOptConfig):
        super().__init__(args)
        self.fedopt = fedopt
        self.server = AdaptiveServerOptimizer(
            self.rule, args.federated.server_lr * fedopt.eta, fedopt.beta1, fedopt.beta2, fedopt.tau
        )

    def divergence_hints(self, where: str) -> list[str]:
        if where != "global_update":
            return []
        hints = [
            f"fedopt.eta = {self.fedopt.eta:g}",
            f"fedopt.tau = {self.fedopt.tau:g}",
            f"federated.server_lr = {self.args.federated.server_lr:g}",
        ]
        return hints if self.rule == "adagrad" else [*hints, f"fedopt.beta2 = {self.fedopt.beta2:g}"]


class FedAdagrad(FedOpt):
    """FedOpt with Adagrad's second moment ``v_t = v_{t-1} + Delta^2`` (``fedopt.beta2`` unused)."""

    name = "fedadagrad"
    rule = "adagrad"


class FedAdam(FedOpt):
    """FedOpt with Adam's second moment ``v_t = beta2 v_{t-1} + (1 - beta2) Delta^2`` (no bias correction)."""

    name = "fedadam"
    rule = "adam"


class FedYogi(FedOpt):
    """FedOpt with Yogi's second moment ``v_t = v_{t-1} - (1 - beta2) Delta^2 sign(v_{t-1} - Delta^2)``."""

    name = "fedyogi"
    rule = "yogi"
