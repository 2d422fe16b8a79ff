"""Federated finetuning (and the baseline) through the stage protocol (:mod:`mllmfl_dist.stages.protocol`):
its outputs, whether it is complete or resumes, read from ``checkpoint.pt`` and ``summary.json``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mllmfl_dist.config import Config
from mllmfl_dist.config.resume import resume_differences
from mllmfl_dist.core import dist, run_lock
from mllmfl_dist.stages.federated import run_federated
from mllmfl_dist.stages.protocol import COMPLETE, FRESH, RESUME, StageStatus


class FederateStage:
    """Federated finetuning through the stage protocol (:mod:`mllmfl_dist.stages.protocol`), on the config
    ``config_of`` makes of the run's (the run's own; the baseline's, in ``<run dir>/baseline/``). Complete when
    ``checkpoint.pt`` is at the last round with the same config and ``summary.json`` (written last, after
    ``model_final.pt``) is newer than it; it resumes from ``checkpoint.pt``'s round otherwise."""

    def __init__(self, name: str = "federate", config_of: Callable[[Config], Config] = lambda cfg: cfg):
        self.name, self.config_of = name, config_of

    def outputs(self, cfg: Config) -> list[Path]:
        paths = self.config_of(cfg).paths
        return [paths.checkpoint, paths.final_model, paths.summary, paths.metrics, paths.rounds, paths.partition]

    def status(self, cfg: Config) -> StageStatus:
        cfg = self.config_of(cfg)
        paths, rounds = cfg.paths, cfg.federated.rounds
        if not paths.checkpoint.is_file():
            return StageStatus(FRESH, f"{rounds} rounds into {paths.federated}")
        try:  # mmap: the header and the config, not the model's tensors
            state = torch.load(paths.checkpoint, map_location="cpu", weights_only=True, mmap=True)
            done, saved = int(state["round"]), state["config"]
        except Exception:  # noqa: BLE001 - any damage: the stage explains it when it loads the file
            return StageStatus(RESUME, f"{paths.checkpoint} (checked when the stage starts)")
        where = f"{paths.checkpoint} (round {done} of {rounds})"
        if done != rounds or resume_differences(saved, cfg.to_dict()) or not paths.final_model.is_file():
            return StageStatus(RESUME, where)
        try:
            summary_written = paths.summary.stat().st_mtime_ns >= paths.checkpoint.stat().st_mtime_ns
            summary = json.loads(paths.summary.read_text())
        except (OSError, ValueError):
            return StageStatus(RESUME, where)
        if summary_written and isinstance(summary, dict) and summary.get("rounds") == rounds:
            return StageStatus(COMPLETE, f"{paths.federated} at round {rounds}")
        return StageStatus(RESUME, where)

    def run(self, cfg: Config, runtime: dist.Runtime) -> dict[str, Any]:
        stage_cfg = self.config_of(cfg)
        with run_lock.holding(runtime, stage_cfg.run_dir):
            return run_federated(stage_cfg, runtime)
