"""FedAvg whose server step clips the clients' averaged update to a largest L2 norm (the server-side clipping
of DP-FedAvg, without its noise): an example of a strategy in a package of its own.

Its hyperparameter is the config section ``[fedavg_clip]`` (``max_norm``), checked like mllmfl_dist's own
sections (a wrong type, a value <= 0 or an unknown key is one error line), written to the run's config.toml and
compared on resume.
"""

from __future__ import annotations

from dataclasses import dataclass

from mllmfl_dist.config.fields import positive
from mllmfl_dist.fl.strategies import FedAvg, StrategyArgs


@dataclass(frozen=True)
class FedAvgClipConfig:
    """``[fedavg_clip]``"""

    max_norm: float = positive(1.0)  # the largest L2 norm of the averaged update (global - mean) applied


class FedAvgClip(FedAvg):
    name = "fedavg_clip"
    sections = {"fedavg_clip": FedAvgClipConfig}

    def __init__(self, args: StrategyArgs, fedavg_clip: FedAvgClipConfig):
        super().__init__(args)  # the server optimizer: federated.server_lr, no momentum
        self.max_norm = fedavg_clip.max_norm

    def update_global_model(self, current, client_mean, trainable_mask):
        delta = current[trainable_mask] - client_mean[trainable_mask]
        norm = float(delta.norm())
        if norm > self.max_norm:  # move the mean so that the update from `current` has norm max_norm
            client_mean = client_mean.clone()
            client_mean[trainable_mask] = current[trainable_mask] - delta * (self.max_norm / norm)
        return super().update_global_model(current, client_mean, trainable_mask)

    def divergence_hints(self, where):
        hints = super().divergence_hints(where)
        return [*hints, f"fedavg_clip.max_norm = {self.max_norm:g}"] if where == "global_update" else hints
