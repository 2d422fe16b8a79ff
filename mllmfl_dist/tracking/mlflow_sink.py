"""MLflow (``pip install 'mllmfl-dist[mlflow]'``): one MLflow run per run directory.

The default store is local: ``sqlite:///<run.root>/mlflow.db`` with artifacts under ``<run.root>/mlartifacts``
(one store for every run under ``run.root``, so a sweep's runs sit side by side; ``mlflow ui
--backend-store-uri sqlite:///runs/mlflow.db``). MLflow 3 keeps its ``./mlruns`` file store only behind
``MLFLOW_ALLOW_FILE_STORE=true``; ``log.mlflow_uri`` takes such a ``file:`` URI, or a tracking server's
``http(s)://`` address. The run id is kept in ``<run dir>/trackers.json``, so stages and resumes continue
the same MLflow run. Parameters are the flat resolved config, written once when the run is created (MLflow
refuses to change a parameter); ``config.toml`` is an artifact, rewritten by each stage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_BATCH = 100  # MLflow's limit of parameters per log_batch call (metrics: 1000)


def default_tracking_uri(run_root: Path) -> str:
    return f"sqlite:///{run_root.resolve() / 'mlflow.db'}"


class MlflowSink:
    name = "mlflow"

    def __init__(
        self, tracking_uri: str, experiment: str, run_name: str, run_id: str | None, artifact_root: Path, run_dir: Path
    ):
        # MLflow and alembic report database creation and migrations at INFO.
        for noisy in ("mlflow", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=tracking_uri)
        found = self._client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found is not None
            else self._client.create_experiment(experiment, artifact_location=artifact_root.resolve().as_uri())
        )
        self.created = True
        if run_id:
            try:
                self._client.update_run(run_id, status="RUNNING")
                self.created = False
            except MlflowException:  # the store was deleted or moved: start a new run
                run_id = None
        if not run_id:
            run = self._client.create_run(experiment_id, run_name=run_name, tags={"mllmfl.run_dir": str(run_dir)})
            run_id = run.info.run_id
        self.run_id = run_id

    def log_config(self, config: Mapping[str, Any], text: str) -> None:
        from mlflow.entities import Param

        if self.created:
            params = [Param(key, str(value)[:6000]) for key, value in config.items()]
            for start in range(0, len(params), _BATCH):
                self._client.log_batch(self.run_id, params=params[start : start + _BATCH])
        self._client.log_text(self.run_id, text, "config.toml")

    def log_scalars(self, scalars: Mapping[str, float], step: int, step_name: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in scalars.items()]
        for start in range(0, len(metrics), 1000):
            self._client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def close(self) -> None:
        self._client.set_terminated(self.run_id, status="FINISHED")
