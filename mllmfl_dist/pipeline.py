"""``run``: the three stages of the method, then the report, in one job.

Which stages run follows from the config: federated finetuning always; DWP pretraining when federated
finetuning starts from this run's backbone (``model.pretrained_backbone = "pretrain"``); annotation when
that pretraining reads this run's captions (``pretrain.shards`` empty); alignment inside the round loop
when ``align.every > 0``. Every stage skips work that is complete, so rerunning the same command after an
interruption picks up where it stopped, and a finished run only rewrites its report.
"""

from __future__ import annotations

import logging
from typing import Any

from mllmfl_dist import dist
from mllmfl_dist.config import Config

log = logging.getLogger(__name__)


def planned_stages(cfg: Config) -> list[str]:
    stages = []
    if cfg.model.pretrained_backbone == "pretrain":
        if not cfg.pretrain.shards:
            stages.append("annotate")
        stages.append("pretrain")
    stages += ["federate", "report"]
    return stages


def run_pipeline(cfg: Config, runtime: dist.Runtime) -> dict[str, Any]:
    """Run the planned stages in order; returns the report's summary on rank 0."""
    stages = planned_stages(cfg)
    log.info("run %s: stages %s", cfg.run_dir, " -> ".join(stages))
    summary: dict[str, Any] = {}
    for stage in stages:
        if stage == "annotate":
            from mllmfl_dist.stages.annotate import run_annotate

            run_annotate(cfg, runtime)
        elif stage == "pretrain":
            from mllmfl_dist.stages.pretrain import run_pretrain

            run_pretrain(cfg, runtime)
        elif stage == "federate":
            from mllmfl_dist.stages.federated import run_federated

            run_federated(cfg, runtime)
        elif stage == "report" and runtime.is_server:
            from mllmfl_dist.stages.report import write_report

            summary = write_report(cfg.run_dir)
    dist.stage_barrier(runtime, "the end of the run (the report)", clients_idle=True)
    return summary
