"""Statistics over seeds for ``compare``: mean, sample standard deviation and a 95% Student-t confidence
interval of a row's per-seed values, the same for paired per-seed differences against a baseline row, the
mean over the last evaluations of a run, and the first round a run reaches a target.

The interval is the textbook one for a mean of n independent values: ``mean +- t_{0.975, n-1} * sd / sqrt(n)``
with ``sd`` the sample standard deviation (ddof = 1); the paired interval is that of the per-seed differences
(the same seed gives both rows identical data, partition and client order, so the differences are the
paired sample). ``t`` comes from :func:`scipy.stats.t.ppf`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scipy.stats import t as student_t

from mllmfl_dist.config import ConfigError

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Spread:
    """``n`` values: their mean, sample standard deviation (ddof = 1) and the half-width of the 95% Student-t
    confidence interval of the mean; ``sd`` and ``ci95`` are None for fewer than two values, everything but
    ``n`` None for none."""

    n: int
    mean: float | None
    sd: float | None
    ci95: float | None


def interval_text(s: Spread) -> str:
    """``s`` as ``"mean +- sd [low, high]"`` (the 95% interval's bounds; 3 decimals), ``"mean"`` for one value,
    ``"-"`` for none: the cells of the examples' tables (examples/dp_epsilon, examples/low_data)."""
    if s.mean is None:
        return "-"
    if s.sd is None or s.ci95 is None:
        return f"{s.mean:.3f}"
    return f"{s.mean:.3f} +- {s.sd:.3f} [{s.mean - s.ci95:.3f}, {s.mean + s.ci95:.3f}]"


def parse_seed_list(text: str, option: str = "--seeds") -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; ConfigError unless distinct non-negative integers separated by commas."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{option} {text!r}: expected distinct non-negative integers separated by commas, e.g. 0,1,2")
    return seeds


def t_quantile(dof: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student-t critical value ``t_{(1 + confidence) / 2, dof}`` (e.g. 2.776 for dof 4)."""
    if dof < 1:
        raise ValueError(f"a t interval needs at least one degree of freedom, got {dof}")
    return float(student_t.ppf((1.0 + confidence) / 2.0, dof))


def spread(values: Sequence[float]) -> Spread:
    """Mean, sd (n - 1) and 95% CI half-width of ``values`` (floats, any unit; the results are in that unit)."""
    n = len(values)
    if n == 0:
        return Spread(0, None, None, None)
    mean = statistics.fmean(values)
    if n == 1:
        return Spread(1, mean, None, None)
    sd = statistics.stdev(values)
    return Spread(n, mean, sd, t_quantile(n - 1) * sd / math.sqrt(n))


def paired_difference(values: Mapping[Any, float], baseline: Mapping[Any, float]) -> Spread:
    """The spread of ``values[s] - baseline[s]`` over the keys (seeds) both hold; a key only one side holds is
    left out (a row that ran on other seeds than the baseline is not paired with it)."""
    return spread([values[s] - baseline[s] for s in values if s in baseline])


def last_mean(evaluations: Sequence[Mapping[str, Any]], key: str, last: int) -> float | None:
    """The mean of ``key`` over the last ``last`` evaluation records (in round order; fewer when the run has
    fewer); None when there is none or one of them lacks ``key``."""
    if last < 1:
        raise ValueError(f"last must be at least 1, got {last}")
    values = [record.get(key) for record in evaluations[-last:]]
    if not values or any(v is None for v in values):
        return None
    return statistics.fmean(values)


def first_round_reaching(evaluations: Sequence[Mapping[str, Any]], target: float, key: str = "acc") -> int | None:
    """The first evaluated round whose ``key`` is at least ``target``; None when no evaluation reaches it."""
    for record in evaluations:
        value = record.get(key)
        if value is not None and value >= target:
            return record.get("round")
    return None
