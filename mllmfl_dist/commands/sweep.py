"""``federate`` / ``run`` with ``--seeds 0,1,2``: the same config once per seed, one run directory each,
then a line per seed and the mean +- standard deviation over the seeds.

Each seed's config is the file with the command's ``--set`` overrides and ``run.seed = k``; a ``run.name``
template is resolved per seed. When the name does not change with the seed (no ``{run.seed}`` in it), each
seed's run lives in ``<run.root>/<name>-seed<k>/``.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mllmfl_dist.config import Config, load_config
from mllmfl_dist.core import preflight

GROUPS = ("many", "medium", "few")


def seed_configs(path: str | Path, overrides: Sequence[str], seeds: Sequence[int]) -> list[Config]:
    configs = [load_config(path, [*overrides, f"run.seed={seed}"]) for seed in seeds]
    if len(seeds) > 1 and len({cfg.run.name for cfg in configs}) == 1:
        configs = [
            dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=f"{cfg.run.name}-seed{cfg.run.seed}"))
            for cfg in configs
        ]
        for cfg in configs:  # the suffix may take the name over the file system's limit
            preflight.check_run_dir(cfg.run.root, cfg.run.name)
    return configs


def _groups(final: Mapping[str, Any]) -> str:
    return ", ".join(f"{g} {final[f'acc_{g}']:.4f}" for g in GROUPS if final.get(f"acc_{g}") is not None)


def seed_line(cfg: Config, final: Mapping[str, Any]) -> str:
    """``seed 1: balanced acc 0.4123 (top-1 0.4200; many 0.5000, medium 0.2000) after round 10 in runs/x-seed1``"""
    if not final:
        return f"seed {cfg.run.seed}: no evaluation (in {cfg.run_dir})"
    return (
        f"seed {cfg.run.seed}: balanced acc {final['acc']:.4f} (top-1 {final.get('acc_top1', float('nan')):.4f}; "
        f"{_groups(final)}) after round {final.get('round')} in {cfg.run_dir}"
    )


def mean_std_line(finals: Sequence[Mapping[str, Any]]) -> str:
    """``mean +- std over 3 seeds: acc 0.4100 +- 0.0100, top-1 ..., many ...`` (sample std, n - 1; a metric
    some seed lacks is left out)."""
    parts = []
    for key, label in (("acc", "acc"), ("acc_top1", "top-1"), *((f"acc_{g}", g) for g in GROUPS)):
        values = [f[key] for f in finals if f and f.get(key) is not None]
        if len(values) != len(finals) or not values:
            continue
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        parts.append(f"{label} {statistics.fmean(values):.4f} +- {std:.4f}")
    return f"mean +- std over {len(finals)} seeds: {', '.join(parts) or 'no evaluation'}"
