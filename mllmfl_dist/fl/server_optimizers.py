"""Adaptive server optimizers of the FedOpt family: FedAdagrad, FedAdam and FedYogi (Reddi et al., "Adaptive
Federated Optimization", ICLR 2021, Algorithm 2), on flat float64 tensors.

The server treats the pseudo-gradient ``Delta = client_mean - current`` (over the trainable entries) as a
gradient step's direction and keeps two per-entry moments, as Algorithm 2 writes them::

    m_t = beta1 * m_{t-1} + (1 - beta1) * Delta
    v_t = v_{t-1} + Delta^2                                          FedAdagrad
    v_t = beta2 * v_{t-1} + (1 - beta2) * Delta^2                    FedAdam
    v_t = v_{t-1} - (1 - beta2) * Delta^2 * sign(v_{t-1} - Delta^2)    FedYogi
    x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)

with ``m_{-1} = 0`` and ``v_{-1} = tau^2``: the paper's Algorithm 2 asks for ``v_{-1} >= tau^2``, and tau^2 is its
smallest allowed value (Flower's FedAdam/FedYogi start from ``v = 0`` instead; they differ in the first rounds only,
by at most tau^2 in ``v``). As in the paper there is no bias correction. Where the paper averages the clients'
deltas uniformly, ``Delta`` here comes from the round's sample-weighted mean, as every strategy of this package
aggregates (and as Flower's FedOpt strategies do, which weight by each client's example count).
"""

from __future__ import annotations

from typing import Any

import torch

RULES = ("adagrad", "adam", "yogi")


def second_moment(rule: str, v: torch.Tensor, delta: torch.Tensor, beta2: float) -> torch.Tensor:
    """``v_t`` of ``rule`` (one of :data:`RULES`) from ``v_{t-1}`` and the pseudo-gradient ``delta`` (same shapes);
    FedAdagrad ignores ``beta2``. ValueError for an unknown rule."""
    squared = delta * delta
    if rule == "adagrad":
        return v + squared
    if rule == "adam":
        return beta2 * v + (1 - beta2) * squared
    if rule == "yogi":
        # Yogi moves v towards Delta^2 by (1 - beta2) Delta^2 where Adam forgets v multiplicatively: after large
        # pseudo-gradients v shrinks slowly, so the step size grows back slowly (Zaheer et al., NeurIPS 2018);
        # v stays > 0 (from v_{-1} = tau^2 > 0: above Delta^2 it falls to no less than beta2 Delta^2).
        return v - (1 - beta2) * squared * torch.sign(v - squared)
    raise ValueError(f"unknown adaptive rule {rule!r}; expected one of {', '.join(RULES)}")


def adaptive_step(
    rule: str,
    x: torch.Tensor,
    delta: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    eta: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One server step of Algorithm 2: returns new tensors ``(x_{t+1}, m_t, v_t)`` (all of ``x``'s shape)."""
    m = beta1 * m + (1 - beta1) * delta
    v = second_moment(rule, v, delta, beta2)
    return x + eta * m / (v.sqrt() + tau), m, v


class AdaptiveServerOptimizer:
    """FedAdagrad / FedAdam / FedYogi on the global model's trainable entries, with the interface of
    :class:`mllmfl_dist.fl.strategies.fedavg.ServerSGD`: :meth:`step` maps (current global model, clients'
    weighted mean, trainable mask), flat float64 vectors of one length, to the next global model. Buffers such
    as BatchNorm statistics (``trainable_mask`` False) take the clients' mean directly. Its state (``m``, ``v``,
    the step count) is what a checkpoint keeps, so a resumed run steps exactly as a straight one."""

    def __init__(self, rule: str, lr: float, beta1: float, beta2: float, tau: float):
        if rule not in RULES:
            raise ValueError(f"unknown adaptive rule {rule!r}; expected one of {', '.join(RULES)}")
        self.rule, self.lr, self.beta1, self.beta2, self.tau = rule, lr, beta1, beta2, tau
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.steps = 0

    def step(self, current: torch.Tensor, client_mean: torch.Tensor, trainable_mask: torch.Tensor) -> torch.Tensor:
        # The global model may have moved since the last step (alignment, a resume): step from where it is.
        x = current[trainable_mask]
        delta = client_mean[trainable_mask] - x
        if self.m is None or self.v is None:
            self.m = torch.zeros_like(x)
            self.v = torch.full_like(x, self.tau**2)
        m, v = self.m.to(x.device), self.v.to(x.device)
        weights, self.m, self.v = adaptive_step(self.rule, x, delta, m, v, self.lr, self.beta1, self.beta2, self.tau)
        self.steps += 1
        new = client_mean.clone()
        new[trainable_mask] = weights
        return new

    def state_dict(self) -> dict[str, Any]:
        """A copy on the CPU: ``{"m", "v"}`` (float64, one entry per trainable entry) and ``"steps"``; empty
        before the first step."""
        if self.m is None or self.v is None:
            return {}
        return {
            "rule": self.rule,
            "m": self.m.detach().cpu().clone(),
            "v": self.v.detach().cpu().clone(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (an empty dict: nothing saved yet). ValueError when it holds another
        rule's moments."""
        if not state:
            return
        if state.get("rule") != self.rule:
            raise ValueError(f"the checkpoint's server optimizer state is {state.get('rule')!r}'s, not {self.rule!r}'s")
        self.m, self.v = state["m"].clone(), state["v"].clone()
        self.steps = int(state["steps"])
