"""Weights & Biases (``pip install 'mllmfl-dist[wandb]'``): one W&B run per run directory.

``log.wandb_mode = "offline"`` (or ``WANDB_MODE=offline``) writes ``<run dir>/wandb/offline-run-*/`` with no
network; ``wandb sync <run dir>/wandb/offline-run-*`` uploads it later. The run id is kept in
``<run dir>/trackers.json``, so every stage of a run, and a resumed run, continue the same W&B run (an
offline resume writes a further offline-run folder with the same id; syncing them joins them). Rounds and
DWP steps are separate axes (``define_metric``): W&B's own step only counts calls.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Which axis each scalar family is plotted against.
_AXES = {"eval/*": "round", "round/*": "round", "pretrain/*": "dwp_step"}


class WandbSink:
    name = "wandb"

    def __init__(self, run_dir: Path, run_name: str, run_id: str, project: str, mode: str, config: Mapping[str, Any]):
        import wandb

        # W&B's own logger reports its service start-up at INFO; our log stays about the run.
        logging.getLogger("wandb").setLevel(logging.WARNING)
        self._run = wandb.init(
            project=project,
            name=run_name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=mode or None,
            config=dict(config),
            settings=wandb.Settings(console="off", silent=True, save_code=False),
        )
        for pattern, axis in _AXES.items():
            self._run.define_metric(axis, hidden=True)
            self._run.define_metric(pattern, step_metric=axis)

    def log_config(self, config: Mapping[str, Any], text: str) -> None:
        # W&B's hparams are the run config (given to init); the TOML goes along as a file of the run.
        self._run.config.update(dict(config), allow_val_change=True)
        path = Path(self._run.dir) / "config.toml"
        path.write_text(text)
        self._run.save(str(path), base_path=self._run.dir, policy="now")

    def log_scalars(self, scalars: Mapping[str, float], step: int, step_name: str) -> None:
        self._run.log({step_name: step, **scalars})

    def close(self) -> None:
        self._run.finish()
