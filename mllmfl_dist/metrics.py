"""Metrics of a stage: one JSON object per line, and TensorBoard events beside the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends JSON records to ``<dir>/<name>`` and mirrors scalar fields to TensorBoard.

    ``truncate_after(round)`` drops records of rounds that a resumed run is about to redo, so the file
    never holds two records for one round.
    """

    def __init__(self, directory: str | Path, name: str = "metrics.jsonl", tensorboard: bool = True):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / name
        self.tensorboard = tensorboard
        self._writer = None

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, round_index: int) -> None:
        kept = [r for r in self.records() if r.get("round", 0) <= round_index]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard:
            self._scalars(record)

    def _scalars(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            # Imported on first use: TensorBoard's import costs about a second at start-up.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.directory))
        step = record.get("round", 0)
        for key, value in record.items():
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
