"""One protocol for every stage of a run: what it leaves on disk, how it knows it is complete, where it resumes.

A stage (annotation, DWP pretraining, federated finetuning, the report) is an object with a ``name`` and three
methods: ``outputs(cfg)``, the files a finished stage leaves; ``status(cfg)``, a :class:`StageStatus` read from
those files and the stage's own resume markers (each stage keeps its markers: annotation's ``<shard>.done.json``
records and ``manifest.json``, DWP's ``metrics.json`` digests and DeepSpeed ``latest`` / ``global_step<N>``
tags, federated finetuning's ``checkpoint.pt`` and ``summary.json``); and ``run(cfg, runtime)``, which does
(or resumes) the work. :func:`drive` is how ``run`` and ``compare`` use them: rank 0 reads the status, every
rank hears it, a complete stage is skipped and any other runs.

``status`` is cheap (it reads small files and headers; it builds no model) and conservative: it says
``complete`` only when ``run`` would have nothing left to do. Anything it cannot settle (an unreadable record, a
checkpoint of another config) it reports as ``resume`` or ``fresh`` and leaves to ``run``, which refuses what it
refused before, with the same message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, Protocol

from mllmfl_dist.config import Config
from mllmfl_dist.core import dist

log = logging.getLogger(__name__)

COMPLETE: Final = "complete"
RESUME: Final = "resume"
FRESH: Final = "fresh"


@dataclass(frozen=True)
class StageStatus:
    """Where a stage stands: ``state`` is ``complete`` (nothing to do), ``resume`` (work on disk to continue
    from) or ``fresh`` (nothing yet); ``detail`` says in one line what was found (``resume``: where it resumes
    from)."""

    state: Literal["complete", "resume", "fresh"]
    detail: str

    @property
    def complete(self) -> bool:
        return self.state == COMPLETE


class Stage(Protocol):
    """A stage of a run (see the module docstring)."""

    name: str

    def outputs(self, cfg: Config) -> list[Path]:
        """The files a finished stage leaves (under ``cfg.run_dir``)."""
        ...

    def status(self, cfg: Config) -> StageStatus:
        """Whether the stage is complete, resumes from work on disk, or starts fresh; never loads a model."""
        ...

    def run(self, cfg: Config, runtime: dist.Runtime) -> dict[str, Any]:
        """Do (or resume) the stage on every rank; what it returns on rank 0 (``{}`` elsewhere)."""
        ...


def drive(stage: Stage, cfg: Config, runtime: dist.Runtime) -> dict[str, Any] | None:
    """Run ``stage`` unless rank 0 finds it complete (every rank hears the same verdict, so all skip or all run);
    logs which, on rank 0. Returns the stage's result, None when it was skipped."""
    status = dist.server_decides(runtime, lambda: stage.status(cfg), f"rank 0's check of the {stage.name} stage")
    if runtime.is_server:
        if status.complete:
            log.info("stage %s: complete, skipped (%s)", stage.name, status.detail)
        elif status.state == RESUME:
            log.info("stage %s: resuming from %s", stage.name, status.detail)
        else:
            log.info("stage %s: starting (%s)", stage.name, status.detail)
    if status.complete:
        return None
    return stage.run(cfg, runtime)
