"""Federated strategies: the interface (:mod:`.base`), the FedAvg family (:mod:`.fedavg`), CReFF (:mod:`.creff`)
and CLIP2FL with its teacher pass (:mod:`.clip2fl`, :mod:`.clip2fl_teacher`).

A strategy of your own, in a package of your own, is found through the entry-point group
``mllmfl_dist.strategies`` (or :func:`register_strategy`); README "Your own strategy" walks through one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from mllmfl_dist.config.plugins import (
    ENTRY_POINT_GROUP,
    builtin_strategy_names,
    register_strategy,
    strategy_class,
    strategy_names,
    unregister_strategy,
)
from mllmfl_dist.core.progress import show_bars
from mllmfl_dist.fl.strategies.base import (
    ClientContext,
    ClientUpdate,
    ModelUse,
    Strategy,
    StrategyArgs,
    StrategyContext,
)
from mllmfl_dist.fl.strategies.fedavg import FedAvg, FedAvgM, FedProx

if TYPE_CHECKING:
    from mllmfl_dist.config import Config

__all__ = [
    "ENTRY_POINT_GROUP",
    "ClientContext",
    "ClientUpdate",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "ModelUse",
    "Strategy",
    "StrategyArgs",
    "StrategyContext",
    "build_strategy",
    "builtin_strategy_names",
    "register_strategy",
    "strategy_class",
    "strategy_names",
    "unregister_strategy",
]


def build_strategy(cfg: Config) -> Strategy:
    """The run's strategy: ``federated.strategy``'s class, built from the [federated] section, the seed and the
    config sections it declares (each passed under its section's name)."""
    cls = cast(type[Strategy], strategy_class(cfg.federated.strategy))  # the registry holds Strategy subclasses
    args = StrategyArgs(cfg.federated, cfg.run.seed, show_bars(cfg.log))
    return cls(args, **{name: cfg.section(name) for name in cls.sections})
