"""The Tracker: rank 0's fan-out of a stage's scalars to the sinks ``[log]`` chooses.

``metrics.jsonl`` / ``rounds.jsonl`` (and the DWP stage's ``metrics.json``) are always written: the report,
``compare`` and resume read them. The Tracker mirrors their numbers to TensorBoard (``log.tensorboard``),
Weights & Biases (``log.wandb``) and MLflow (``log.mlflow``). Tracking must never stop training: a sink that
fails to start or to log is reported once, as a warning naming it, and left out for the rest of the stage.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mllmfl_dist.core.checkpoint import write_text_atomic
from mllmfl_dist.config import Config, ConfigError, LogConfig, flat_items
from mllmfl_dist.tracking.base import Sink, flatten_scalars
from mllmfl_dist.tracking.mlflow_sink import MlflowSink, default_tracking_uri
from mllmfl_dist.tracking.tensorboard_sink import TensorBoardSink
from mllmfl_dist.tracking.wandb_sink import WandbSink

log = logging.getLogger(__name__)

IDS_NAME = "trackers.json"  # <run dir>/trackers.json: the W&B and MLflow run ids of this run directory
# [log] key -> (module it needs, the install command to name)
OPTIONAL = {
    "wandb": ("wandb", "pip install 'mllmfl-dist[wandb]'"),
    "mlflow": ("mlflow", "pip install 'mllmfl-dist[mlflow]'"),
}


def check_trackers(log_cfg: LogConfig) -> None:
    """Raise ConfigError, on every rank alike, when a chosen tracker's package is not installed."""
    for key, (module, install) in OPTIONAL.items():
        if getattr(log_cfg, key) and importlib.util.find_spec(module) is None:
            raise ConfigError(f"log.{key} = true needs the {module} package: {install} (or set log.{key} = false)")
    if log_cfg.mlflow and not log_cfg.mlflow_uri and importlib.util.find_spec("sqlalchemy") is None:
        raise ConfigError(
            f"log.mlflow = true stores runs in SQLite, which needs sqlalchemy and alembic: "
            f"{OPTIONAL['mlflow'][1]} (or set log.mlflow_uri to a tracking server)"
        )


class Tracker:
    """Scalars to every live sink. ``log(record, prefix=, step=)``: the numbers of one JSONL record (nested
    values flattened, see :func:`~mllmfl_dist.tracking.base.flatten_scalars`) at ``step`` of ``step_name``."""

    def __init__(self, sinks: Sequence[Sink] = ()):
        self.sinks = list(sinks)

    @property
    def names(self) -> list[str]:
        return [sink.name for sink in self.sinks]

    def log_config(self, cfg: Config) -> None:
        flat = flat_items(cfg.to_dict())
        text = cfg.to_toml()
        self._each("record the config", lambda sink: sink.log_config(flat, text))

    def log(
        self,
        record: Mapping[str, Any],
        *,
        prefix: str,
        step: int,
        step_name: str = "round",
        class_names: Sequence[str] = (),
        skip: Sequence[str] = ("round", "step"),
    ) -> dict[str, float]:
        scalars = flatten_scalars({k: v for k, v in record.items() if k not in skip}, prefix, class_names)
        if scalars:
            self._each("log", lambda sink: sink.log_scalars(scalars, step, step_name))
        return scalars

    def close(self) -> None:
        self._each("close", lambda sink: sink.close())
        self.sinks = []

    def _each(self, what: str, call) -> None:
        for sink in list(self.sinks):
            try:
                call(sink)
            except Exception as err:  # noqa: BLE001 - a tracker must not end the run; say so and go on
                log.warning(
                    "%s could not %s (%s: %s); it is left out for the rest of this stage",
                    sink.name,
                    what,
                    type(err).__name__,
                    _first_line(err),
                )
                self.sinks.remove(sink)


def open_tracker(cfg: Config, stage_dir: Path, *, purge_step: int | None = None) -> Tracker:
    """The sinks of ``cfg.log`` for a stage writing to ``stage_dir`` (rank 0 only), with the config logged.
    ``purge_step``: TensorBoard drops events from that step on (rounds a resumed run redoes)."""
    ids_path = cfg.run_dir / IDS_NAME
    ids = _read_ids(ids_path)
    run_root = Path(cfg.run.root)
    project = cfg.log.project
    starters = []
    if cfg.log.tensorboard:
        starters.append(("tensorboard", lambda: TensorBoardSink(stage_dir, purge_step)))
    if cfg.log.wandb:
        ids.setdefault("wandb", secrets.token_hex(4))
        starters.append(
            (
                "wandb",
                lambda: WandbSink(cfg.run_dir, cfg.run.name, ids["wandb"], project, cfg.log.wandb_mode, cfg.to_dict()),
            )
        )
    if cfg.log.mlflow:
        uri = cfg.log.mlflow_uri or default_tracking_uri(run_root)
        starters.append(
            (
                "mlflow",
                lambda: MlflowSink(
                    uri, project, cfg.run.name, ids.get("mlflow"), run_root / "mlartifacts", cfg.run_dir
                ),
            )
        )
    sinks = []
    for name, start in starters:
        try:
            sinks.append(start())
        except Exception as err:  # noqa: BLE001 - see the module docstring
            log.warning(
                "%s could not start (%s: %s); this stage is not logged there",
                name,
                type(err).__name__,
                _first_line(err),
            )
    for sink in sinks:
        if sink.name == "mlflow":
            ids["mlflow"] = sink.run_id
    if cfg.log.wandb or cfg.log.mlflow:
        ids_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(ids_path, json.dumps(ids, indent=2))
    tracker = Tracker(sinks)
    tracker.log_config(cfg)
    return tracker


def _read_ids(path: Path) -> dict[str, str]:
    try:
        ids = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: str(v) for k, v in ids.items() if isinstance(k, str)} if isinstance(ids, dict) else {}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else ""
