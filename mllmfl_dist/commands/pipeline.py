"""``run``: the three stages of the method, then the report, in one job.

Which stages run follows from the config: federated finetuning always; DWP pretraining when federated
finetuning starts from this run's backbone (``model.pretrained_backbone = "pretrain"``); annotation when
that pretraining reads this run's captions (``pretrain.shards`` empty); alignment inside the round loop
when ``align.every > 0``; and, when the config runs a stage of the method, FedAvg from scratch on the same
data and seed in ``<run dir>/baseline/`` (``run.baseline``), for the report. Every stage skips work that is
complete, so rerunning the same command after an interruption picks up where it stopped, and a finished run
only rewrites its report.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from mllmfl_dist.core import dist, run_lock
from mllmfl_dist.config import Config
from mllmfl_dist.stages.annotate import run_annotate
from mllmfl_dist.stages.pretrain import run_pretrain
from mllmfl_dist.stages.federated import run_federated
from mllmfl_dist.stages.report import write_report

log = logging.getLogger(__name__)

BASELINE = "baseline"


def uses_the_method(cfg: Config) -> bool:
    """Whether the config runs a stage of the MLLM-assisted method (DWP pretraining or alignment)."""
    return cfg.model.pretrained_backbone == "pretrain" or cfg.align.every > 0


def planned_stages(cfg: Config) -> list[str]:
    stages = []
    if cfg.model.pretrained_backbone == "pretrain":
        if not cfg.pretrain.shards:
            stages.append("annotate")
        stages.append("pretrain")
    stages.append("federate")
    if cfg.run.baseline and uses_the_method(cfg):
        stages.append("baseline")
    stages.append("report")
    return stages


def baseline_config(cfg: Config) -> Config:
    """FedAvg from a randomly initialised backbone without alignment, on the same data, partition, seed and
    ranks, in ``<run dir>/baseline/``: the curve the report sets beside the method."""
    return dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, root=str(cfg.run_dir), name=BASELINE, baseline=False),
        federated=dataclasses.replace(cfg.federated, strategy="fedavg"),
        model=dataclasses.replace(cfg.model, pretrained_backbone=""), align=dataclasses.replace(cfg.align, every=0))


def run_pipeline(cfg: Config, runtime: dist.Runtime) -> dict[str, Any]:
    """Run the planned stages in order, holding the run directory (a ``compare`` row's own, or ``run``'s, held
    already); returns the report's summary on rank 0. RunDirBusyError when another job holds it."""
    with run_lock.holding(runtime, cfg.run_dir):
        return _stages(cfg, runtime)


def _stages(cfg: Config, runtime: dist.Runtime) -> dict[str, Any]:
    stages = planned_stages(cfg)
    log.info("run %s: stages %s", cfg.run_dir, " -> ".join(stages))
    summary: dict[str, Any] = {}
    for stage in stages:
        if stage == "annotate":
            run_annotate(cfg, runtime)
        elif stage == "pretrain":
            run_pretrain(cfg, runtime)
        elif stage in ("federate", "baseline"):
            stage_cfg = cfg if stage == "federate" else baseline_config(cfg)
            with run_lock.holding(runtime, stage_cfg.run_dir):
                run_federated(stage_cfg, runtime)
        elif stage == "report" and runtime.is_server:
            # A `report` command on this run may be writing the same folder: wait for it (seconds).
            with run_lock.holding_report(cfg.paths.report, runtime.run_locks.command, wait=True):
                summary = write_report(cfg.run_dir)
    dist.stage_barrier(runtime, "the end of the run (the report)", clients_idle=True)
    return summary


def run_stage1(cfg: Config, runtime: dist.Runtime) -> Path:
    """Annotation (when DWP reads this run's captions) and DWP alone; returns the backbone's path."""
    with run_lock.holding(runtime, cfg.run_dir):
        if not cfg.pretrain.shards:
            run_annotate(cfg, runtime)
        run_pretrain(cfg, runtime)
    return cfg.run_dir / "pretrain" / "backbone.pt"
