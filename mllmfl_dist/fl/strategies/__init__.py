"""Federated strategies (being split into one module per family)."""

from mllmfl_dist.fl.strategies.base import *  # noqa: F401,F403
from mllmfl_dist.fl.strategies.base import STRATEGIES, RunContext, Strategy, build_strategy  # noqa: F401
