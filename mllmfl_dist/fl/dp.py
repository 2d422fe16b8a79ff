"""Central differential privacy for the round loop: DP-FedAvg (McMahan, Ramage, Talwar and Zhang, "Learning
Differentially Private Recurrent Language Models", ICLR 2018), with Google's ``dp-accounting`` as accountant.

The mechanism, per round: each sampled client's update ``delta_k = state_k - start`` (the whole flat state,
BatchNorm's running mean and variance included) is clipped as ONE vector to L2 norm ``C``; every client weighs 1
(sample-count weights would let one client's weight, hence its influence, grow without bound); rank 0 adds
``N(0, (z C)^2 I)`` once to the all-reduced sum, from a generator seeded by (seed, round); the mean
``start + (sum + noise) / K`` goes to the strategy's server step as usual. Integer buffers (BatchNorm's
``num_batches_tracked``, a step count that would reveal the client's sample count; BatchNorm with a momentum
never reads it) and frozen parameters (``requires_grad`` False, which no client moves) get no update and no noise
while DP is on. Clamping the noisy running variances at 0 is post-processing.

Accounting: one event per round, matching :func:`mllmfl_dist.fl.sampling.sample_clients` (K of N clients, fixed
size, without replacement, q = K / N), under replace-one adjacency (N is public). Replacing one client moves the
sum of clipped updates by up to ``2 C``, so the event's Gaussian has noise multiplier ``z / 2`` (std over the
replace-one sensitivity).

- ``rdp``: ``SampledWithoutReplacementDpEvent`` on dp-accounting's RDP accountant (Wang, Balle and
  Kasiviswanathan, AISTATS 2019, Thm. 27): the trainer's sampling exactly.
- ``pld``: dp-accounting's PLD accountant has no ``SampledWithoutReplacementDpEvent``. It accounts
  ``PoissonSampledDpEvent(q, Gaussian(z / 2))`` under add-or-remove: for sampling without replacement under
  replace-one, (q P + (1 - q) Q, Q) with (P, Q) the base mechanism's replace-one dominating pair dominates the
  subsampled mechanism (Zhu, Dong and Wang, AISTATS 2022, "Optimal accounting of differential privacy via
  characteristic function"), which is that Poisson pair with sensitivity 2 C. Tighter than ``rdp``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection
from typing import Any

import torch

from mllmfl_dist.config.schema import DpConfig
from mllmfl_dist.core.errors import ConfigError
from mllmfl_dist.core.seeds import TAG_DP_NOISE, generator
from mllmfl_dist.fl.aggregation import FlatLayout

# RDP orders: the default's fractional orders below 11 fail to converge for sampling without replacement.
RDP_ORDERS = (1.25, 1.5, 1.75, *range(2, 64), 80, 96, 128, 192, 256, 512, 1024)
# PLD grid: 1e-3 gives the same epsilon as dp-accounting's 1e-4 to 4 digits (q = 0.1, z = 1, 100 rounds) at a
# twentieth of the time; the estimate stays pessimistic (an upper bound).
PLD_DISCRETIZATION = 1e-3
CALIBRATION_BRACKET = (0.05, 1000.0)  # noise multipliers searched for dp.target_epsilon


def clip_update(
    start: torch.Tensor, state: torch.Tensor, clip_norm: float, update_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """``start + delta * min(1, C / ||delta||)`` with ``delta = state - start`` (flat float64 ``[numel]``),
    entries outside ``update_mask`` (bool ``[numel]``; None: all) held at ``start``; returns it and
    ``||delta||`` before clipping."""
    delta = state.to(torch.float64) - start.to(torch.float64)
    if update_mask is not None:
        delta[~update_mask] = 0
    norm = float(torch.linalg.vector_norm(delta))
    if norm > clip_norm:
        delta.mul_(clip_norm / norm)
    return start.to(torch.float64) + delta, norm


def gaussian_noise(numel: int, std: float, seed: int, round_index: int) -> torch.Tensor:
    """``N(0, std^2 I)`` of ``[numel]`` float64, from the stream (seed, TAG_DP_NOISE, round): the same on any
    world size and after a resume."""
    noise = torch.randn(numel, dtype=torch.float64, generator=generator(seed, TAG_DP_NOISE, round_index))
    return noise.mul_(std)


class CentralDP:
    """The trainer's side of DP-FedAvg: :meth:`clip` on a client host, :meth:`noisy_mean` on rank 0."""

    def __init__(
        self, layout: FlatLayout, clip_norm: float, noise_multiplier: float, seed: int, frozen: Collection[str] = ()
    ):
        """``frozen``: keys of ``layout`` that are parameters no client trains (``requires_grad`` False). They
        get no update and no noise: nothing moves them, so noise would only corrupt them (and the mean of K
        copies of a value is that value, so they stay bit-identical)."""
        self.clip_norm, self.noise_multiplier, self.seed = clip_norm, noise_multiplier, seed
        mask = torch.zeros(layout.numel, dtype=torch.bool)
        nonneg = torch.zeros(layout.numel, dtype=torch.bool)
        frozen = set(frozen)
        for i, key in enumerate(layout.keys):
            span = slice(layout.offsets[i], layout.offsets[i + 1])
            mask[span] = layout.dtypes[i].is_floating_point and key not in frozen
            nonneg[span] = key.endswith("running_var")
        self.update_mask, self.nonneg_mask = mask, nonneg

    @classmethod
    def of_module(cls, module: torch.nn.Module, clip_norm: float, noise_multiplier: float, seed: int) -> CentralDP:
        """Over ``module``'s state dict: its trainable parameters and float buffers (BatchNorm statistics)."""
        frozen = [name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad]
        return cls(FlatLayout.of_module(module), clip_norm, noise_multiplier, seed, frozen)

    def clip(self, start: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """A client's state with its update clipped (:func:`clip_update`); the weight it then takes is 1."""
        clipped, _ = clip_update(start, state, self.clip_norm, self.update_mask.to(start.device))
        return clipped

    def noisy_mean(self, acc: torch.Tensor, round_index: int) -> torch.Tensor:
        """Rank 0, after the all_reduce: ``acc`` holds the sum of the K clipped states and K in its last entry;
        returns ``(sum + noise) / K``, the noise on the updated entries only."""
        count = float(acc[-1])
        if count <= 0:
            raise RuntimeError("no client contributed this round")
        total = acc[:-1].clone()
        noise = gaussian_noise(
            int(self.update_mask.sum()), self.noise_multiplier * self.clip_norm, self.seed, round_index
        )
        mask = self.update_mask.to(total.device)
        total[mask] += noise.to(total.device)
        mean = total / count
        nonneg = self.nonneg_mask.to(mean.device)
        mean[nonneg] = mean[nonneg].clamp(min=0)
        return mean


def dp_event(
    num_clients: int, clients_per_round: int, noise_multiplier: float, accountant: str, rounds: int = 1
) -> Any:
    """The dp-accounting event of ``rounds`` rounds (see the module docstring for why ``z / 2``)."""
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / 2)
    if accountant == "rdp":
        one = dp_accounting.SampledWithoutReplacementDpEvent(num_clients, clients_per_round, gaussian)
    else:
        one = dp_accounting.PoissonSampledDpEvent(clients_per_round / num_clients, gaussian)
    return one if rounds == 1 else dp_accounting.SelfComposedDpEvent(one, rounds)


def new_accountant(accountant: str) -> Any:
    import dp_accounting
    from dp_accounting import pld, rdp

    if accountant == "rdp":
        return rdp.RdpAccountant(
            orders=list(RDP_ORDERS), neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
        )
    return pld.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=PLD_DISCRETIZATION,
    )


def epsilon(
    num_clients: int, clients_per_round: int, noise_multiplier: float, rounds: int, delta: float, accountant: str
) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds of the trainer's DP-FedAvg."""
    acc = new_accountant(accountant)
    acc.compose(dp_event(num_clients, clients_per_round, noise_multiplier, accountant, rounds))
    return float(acc.get_epsilon(delta))


def check_settings(cfg: DpConfig, num_clients: int, clients_per_round: int, rounds: int) -> None:
    """ConfigError (one line) for DP settings no accountant can run: without ``dp.target_epsilon``, a noise
    multiplier below the calibration bracket (0 divides by zero in the accountants; a few hundredths already
    give an epsilon in the tens of thousands, and the PLD grid of a smaller one exhausts memory); with it, a
    target below the epsilon of the most noise searched (cheap: one accountant call). A target above the
    epsilon of the least noise searched is refused by :func:`calibrate_noise_multiplier`. Run by the config
    loader on every rank, before any process group exists."""
    if not cfg.enabled:
        return
    low, high = CALIBRATION_BRACKET
    if cfg.target_epsilon <= 0:
        if cfg.noise_multiplier < low:
            raise ConfigError(
                f"dp.noise_multiplier = {cfg.noise_multiplier:g} is not allowed with dp.enabled = "
                f"true; it must be >= {low:g} (or give dp.target_epsilon > 0 to derive it)"
            )
        return
    smallest = epsilon(num_clients, clients_per_round, high, rounds, cfg.delta, cfg.accountant)
    if cfg.target_epsilon < smallest:
        raise ConfigError(
            f"dp.target_epsilon = {cfg.target_epsilon:g} cannot be reached: even noise multiplier "
            f"{high:g} gives epsilon {smallest:.4g} after federated.rounds = {rounds} rounds of "
            f"{clients_per_round} of {num_clients} clients at dp.delta = {cfg.delta:g}; raise "
            f"dp.target_epsilon or dp.delta, or lower federated.rounds or federated.clients_per_round"
        )


@functools.lru_cache(maxsize=8)
def calibrate_noise_multiplier(cfg: DpConfig, num_clients: int, clients_per_round: int, rounds: int) -> float:
    """The smallest noise multiplier (to 1e-3) whose epsilon after ``rounds`` rounds is at most
    ``cfg.target_epsilon`` (dp-accounting's ``calibrate_dp_mechanism``, a bisection over
    :data:`CALIBRATION_BRACKET`). Deterministic, so every rank may run it and reach the same verdict; cached,
    since the stage and the ledger ask for it in one process. ConfigError when the target lies outside what the
    bracket reaches."""
    from dp_accounting import mechanism_calibration as mc

    low, high = CALIBRATION_BRACKET
    try:
        return float(
            mc.calibrate_dp_mechanism(
                lambda: new_accountant(cfg.accountant),
                lambda z: dp_event(num_clients, clients_per_round, z, cfg.accountant, rounds),
                cfg.target_epsilon,
                cfg.delta,
                mc.ExplicitBracketInterval(low, high),
                tol=1e-3,
            )
        )
    except ValueError:  # brentq: the target is not between the epsilons of the bracket's ends
        smallest = epsilon(num_clients, clients_per_round, high, rounds, cfg.delta, cfg.accountant)
        if cfg.target_epsilon < smallest:
            where = f"below {smallest:.4g}, the epsilon of noise multiplier {high:g}; raise it"
        else:
            where = (
                f"above the epsilon of noise multiplier {low:g}, the least noise searched; set "
                f"dp.target_epsilon = 0 and give dp.noise_multiplier instead"
            )
        raise ConfigError(
            f"dp.target_epsilon = {cfg.target_epsilon:g} cannot be reached after federated.rounds "
            f"= {rounds} rounds of {clients_per_round} of {num_clients} clients at dp.delta = "
            f"{cfg.delta:g}: it is {where}"
        ) from None


def noise_multiplier_of(cfg: DpConfig, num_clients: int, clients_per_round: int, rounds: int) -> float:
    """The run's noise multiplier: ``dp.noise_multiplier``, or calibrated to ``dp.target_epsilon`` (> 0)."""
    if cfg.target_epsilon > 0:
        return calibrate_noise_multiplier(cfg, num_clients, clients_per_round, rounds)
    return cfg.noise_multiplier


class PrivacyLedger:
    """Rank 0: the run's noise multiplier (given or calibrated) and epsilon after each round. Composes one
    event per round, so a round costs one composition; the ledger is a function of the config and the round,
    so a resume rebuilds it."""

    def __init__(self, cfg: DpConfig, num_clients: int, clients_per_round: int, rounds: int):
        self.cfg, self.num_clients, self.clients_per_round = cfg, num_clients, clients_per_round
        self.noise_multiplier = noise_multiplier_of(cfg, num_clients, clients_per_round, rounds)
        self._accountant = new_accountant(cfg.accountant)
        self._one_round_rdp: Any = None  # the accountant's RDP curve over RDP_ORDERS, once composed
        self._rounds = 0

    def epsilon(self, round_index: int) -> float:
        """Epsilon at ``dp.delta`` after rounds 1..``round_index``."""
        cfg = self.cfg
        if cfg.accountant == "rdp":  # RDP adds up: one round's curve (the costly part) scaled by the rounds
            from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

            if self._one_round_rdp is None:
                self._accountant.compose(
                    dp_event(self.num_clients, self.clients_per_round, self.noise_multiplier, "rdp")
                )
                self._one_round_rdp = self._accountant.rdp
            return float(compute_epsilon(RDP_ORDERS, self._one_round_rdp * round_index, cfg.delta)[0])
        if round_index < self._rounds:
            self._accountant, self._rounds = new_accountant("pld"), 0
        if round_index > self._rounds:
            self._accountant.compose(
                dp_event(
                    self.num_clients, self.clients_per_round, self.noise_multiplier, "pld", round_index - self._rounds
                )
            )
            self._rounds = round_index
        value = float(self._accountant.get_epsilon(cfg.delta))
        return value if math.isfinite(value) else float("inf")
