"""Where the DWP stage stands, from its markers alone: ``metrics.json`` with the digests of ``backbone.pt`` and
``adapter.pt`` marks it finished; DeepSpeed's ``latest`` and ``global_step<N>`` tags under ``deepspeed/`` are
where it resumes (:mod:`mllmfl_dist.stages.pretrain.resume` picks and verifies the tag when the stage runs)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mllmfl_dist.config import Config, ConfigError
from mllmfl_dist.core import checkpoint
from mllmfl_dist.stages.pretrain.captions import ADAPTER_NAME, BACKBONE_NAME, DEEPSPEED_DIR, METRICS_NAME, stage_dir
from mllmfl_dist.stages.pretrain.resume import LATEST, tag_dirs
from mllmfl_dist.stages.protocol import COMPLETE, FRESH, RESUME, StageStatus

log = logging.getLogger(__name__)


def finished(out: Path, *, quiet: bool = False) -> bool:
    """Whether ``metrics.json`` marks the stage finished and the outputs it records are the files on disk; a
    torn or replaced ``backbone.pt`` is rewritten from the last DeepSpeed checkpoint instead of being used."""
    try:
        metrics = json.loads((out / METRICS_NAME).read_text())
    except (OSError, ValueError):
        return False
    outputs = metrics.get("outputs") if isinstance(metrics, dict) else None
    if outputs is None:  # written before the outputs were recorded
        return (out / BACKBONE_NAME).is_file()
    intact = isinstance(outputs, dict) and all(
        checkpoint.same_file(out / name, outputs.get(name)) for name in (BACKBONE_NAME, ADAPTER_NAME)
    )
    if not intact and not quiet:
        log.warning(
            "pretrain: %s or %s is not the file %s recorded (truncated or replaced since); writing them "
            "again from the last DeepSpeed checkpoint",
            BACKBONE_NAME,
            ADAPTER_NAME,
            METRICS_NAME,
        )
    return intact


def pretrain_outputs(cfg: Config) -> list[Path]:
    out = stage_dir(cfg)
    return [out / BACKBONE_NAME, out / ADAPTER_NAME, out / METRICS_NAME]


def pretrain_status(cfg: Config) -> StageStatus:
    """Complete (:func:`finished`), resuming from the newest DeepSpeed tag (``latest``'s, or the newest
    directory when ``latest`` is unusable: the stage verifies it and may fall back further), or fresh."""
    out = stage_dir(cfg)
    ds_dir = out / DEEPSPEED_DIR
    if finished(out, quiet=True):
        return StageStatus(COMPLETE, f"{out / METRICS_NAME} records {BACKBONE_NAME} and {ADAPTER_NAME}")
    try:
        tags = tag_dirs(ds_dir)
        latest = (ds_dir / LATEST).read_text().strip() if (ds_dir / LATEST).is_file() else ""
    except (ConfigError, OSError, UnicodeDecodeError):  # the stage refuses or repairs it, in its own words
        return StageStatus(RESUME, f"{ds_dir} (checked when the stage starts)")
    if latest in {path.name for path in tags.values()}:
        return StageStatus(RESUME, f"{ds_dir / latest}")
    if tags:
        return StageStatus(RESUME, f"{tags[max(tags)]} (newest; {LATEST} is unusable)")
    return StageStatus(FRESH, f"{cfg.pretrain.steps} DWP steps into {out}")
