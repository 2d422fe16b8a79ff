"""``run``: the three stages of the method, then the report, in one job.

Which stages run follows from the config: federated finetuning always; DWP pretraining when federated
finetuning starts from this run's backbone (``model.pretrained_backbone = "pretrain"``); annotation when
that pretraining reads this run's captions (``pretrain.shards`` empty); alignment inside the round loop
when ``align.every > 0``; and, when the config runs a stage of the method, FedAvg from scratch on the same
data and seed in ``<run dir>/baseline/`` (``run.baseline``), for the report. The stages are objects of one
protocol (:mod:`mllmfl_dist.stages.protocol`): rank 0 reads each one's status from its markers on disk, a
complete stage is skipped and any other starts or resumes, so rerunning the same command after an interruption
picks up where it stopped, and a finished run only rewrites its report.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from mllmfl_dist.core import dist, run_lock
from mllmfl_dist.config import Config
from mllmfl_dist.stages.annotate import AnnotateStage
from mllmfl_dist.stages.pretrain.recipe import PretrainStage
from mllmfl_dist.stages.federated_status import FederateStage
from mllmfl_dist.stages.protocol import Stage, drive
from mllmfl_dist.stages.report import ReportStage

log = logging.getLogger(__name__)

BASELINE = "baseline"


def uses_the_method(cfg: Config) -> bool:
    """Whether the config runs a stage of the MLLM-assisted method (DWP pretraining or alignment)."""
    return cfg.model.pretrained_backbone == "pretrain" or cfg.align.every > 0


def plan(cfg: Config) -> list[Stage]:
    """The stages the config runs, in order (the module docstring says which)."""
    stages: list[Stage] = []
    if cfg.model.pretrained_backbone == "pretrain":
        if not cfg.pretrain.shards:
            stages.append(AnnotateStage())
        stages.append(PretrainStage())
    stages.append(FederateStage())
    if cfg.run.baseline and uses_the_method(cfg):
        stages.append(FederateStage(BASELINE, baseline_config))
    stages.append(ReportStage())
    return stages


def planned_stages(cfg: Config) -> list[str]:
    return [stage.name for stage in plan(cfg)]


def baseline_config(cfg: Config) -> Config:
    """FedAvg from a randomly initialised backbone without alignment, on the same data, partition, seed and
    ranks, in ``<run dir>/baseline/``: the curve the report sets beside the method."""
    return dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, root=str(cfg.run_dir), name=BASELINE, baseline=False),
        federated=dataclasses.replace(cfg.federated, strategy="fedavg"),
        model=dataclasses.replace(cfg.model, pretrained_backbone=""),
        align=dataclasses.replace(cfg.align, every=0),
    )


def run_pipeline(cfg: Config, runtime: dist.Runtime) -> dict[str, Any]:
    """Run the planned stages in order, holding the run directory (a ``compare`` row's own, or ``run``'s, held
    already); returns the report's summary on rank 0. RunDirBusyError when another job holds it."""
    with run_lock.holding(runtime, cfg.run_dir):
        return _stages(cfg, runtime)


def _stages(cfg: Config, runtime: dist.Runtime) -> dict[str, Any]:
    stages = plan(cfg)
    log.info("run %s: stages %s", cfg.run_dir, " -> ".join(stage.name for stage in stages))
    results = {stage.name: drive(stage, cfg, runtime) for stage in stages}
    dist.stage_barrier(runtime, "the end of the run (the report)", clients_idle=True)
    return results.get("report") or {}


def run_stage1(cfg: Config, runtime: dist.Runtime) -> Path:
    """Annotation (when DWP reads this run's captions) and DWP alone; returns the backbone's path."""
    with run_lock.holding(runtime, cfg.run_dir):
        for stage in ([] if cfg.pretrain.shards else [AnnotateStage()]) + [PretrainStage()]:
            drive(stage, cfg, runtime)
    return cfg.run_dir / "pretrain" / "backbone.pt"
