"""Rank 0's account of the DWP steps: a tqdm bar on a terminal, a log line every ``pretrain.checkpoint_every``
steps when stderr is a file, and the ``pretrain/*`` scalars for the trackers (loss curve, alpha, held-out
losses, samples/s) against the ``dwp_step`` axis."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mllmfl_dist.config import Config
from mllmfl_dist.core import dist
from mllmfl_dist.core.progress import show_bars
from mllmfl_dist.tracking import Tracker, open_tracker

log = logging.getLogger("mllmfl_dist.stages.pretrain")

STEP_AXIS = "dwp_step"


class PretrainReport:
    def __init__(
        self,
        cfg: Config,
        runtime: dist.Runtime,
        out: Path,
        start: int,
        heldout_step0: float,
        *,
        global_batch: int,
        progress: bool = True,
    ):
        self.cfg, self.start, self.global_batch = cfg, start, global_batch
        self.server = runtime.is_server
        self.bars = progress and self.server and show_bars(cfg.log)
        steps = cfg.pretrain.steps
        self.bar = tqdm(
            total=steps, initial=start, desc="pretrain (DWP)", unit="step", dynamic_ncols=True, disable=not self.bars
        )
        self.tracker = open_tracker(cfg, out, purge_step=start + 1) if self.server else Tracker()
        self._window: list[dict[str, Any]] = []
        self._seconds = 0.0
        if self.server:
            log.info(
                "pretrain: steps %d-%d, global batch %d on %d data-parallel rank(s); held-out LM loss with FL "
                "features %.3f at step 0",
                start + 1,
                steps,
                global_batch,
                runtime.world_size,
                heldout_step0,
            )
            if start == 0:
                self._log({"heldout_loss_alpha1": heldout_step0}, 0)

    def step(self, record: dict[str, Any], seconds: float) -> None:
        """After each optimizer step: ``record`` = ``{"step", "loss", "alpha"}``, ``seconds`` its wall time."""
        if not self.server:
            return
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", alpha=f"{record['alpha']:.3f}")
        self.bar.update(1)
        self._log({"loss": record["loss"], "alpha": record["alpha"]}, record["step"])
        self._window.append(record)
        self._seconds += seconds
        if not self.bars and (
            record["step"] % self.cfg.pretrain.checkpoint_every == 0 or record["step"] == self.cfg.pretrain.steps
        ):
            loss = sum(r["loss"] for r in self._window) / len(self._window)
            log.info(
                "pretrain: step %d/%d, loss %.4f (mean of %d steps), alpha %.3f, %.1f samples/s",
                record["step"],
                self.cfg.pretrain.steps,
                loss,
                len(self._window),
                record["alpha"],
                self.global_batch * len(self._window) / max(self._seconds, 1e-9),
            )
            self._window, self._seconds = [], 0.0

    def close(self, metrics: dict[str, Any] | None = None) -> None:
        """At the end (``metrics``: metrics.json's content on rank 0) or when stopped early (None)."""
        self.bar.close()
        if self.server and metrics:
            keys = ("heldout_loss_alpha1", "heldout_loss_alpha0", "samples_per_second")
            self._log({k: metrics[k] for k in keys}, metrics["steps"])
            log.info(
                "pretrain: done, %d steps; held-out LM loss with FL features %.3f -> %.3f (CLIP features: %.3f), "
                "%.1f samples/s",
                metrics["steps"],
                metrics["heldout_loss_alpha1_step0"],
                metrics["heldout_loss_alpha1"],
                metrics["heldout_loss_alpha0"],
                metrics["samples_per_second"],
            )
        self.tracker.close()

    def _log(self, values: dict[str, Any], step: int) -> None:
        self.tracker.log(values, prefix="pretrain/", step=step, step_name=STEP_AXIS)
