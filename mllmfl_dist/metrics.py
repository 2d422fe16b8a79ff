"""Metrics of a stage: one JSON object per line, and TensorBoard events beside the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mllmfl_dist.checkpoint import append_text, output_errors, write_text_atomic


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, up to the first line that does not parse (a line torn by a job
    killed mid-write; what follows it is not trusted); [] for a missing file."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    # errors="replace": bytes a power loss left garbled only spoil their own line, which is then dropped
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if isinstance(record, dict):
            records.append(record)
    return records


class MetricsLog:
    """Appends JSON records to ``<dir>/<name>`` and mirrors scalar fields to TensorBoard.

    ``truncate_after(round)`` drops records of rounds that a resumed run is about to redo, so the file
    never holds two records for one round; TensorBoard events of those rounds are purged likewise.
    """

    def __init__(self, directory: str | Path, name: str = "metrics.jsonl", tensorboard: bool = True):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / name
        self.tensorboard = tensorboard
        self._writer = None
        self._purge_step: int | None = None

    def records(self) -> list[dict[str, Any]]:
        """The records; a last line torn by a job killed mid-write is dropped (its round is redone)."""
        return read_jsonl(self.path)

    def truncate_after(self, round_index: int) -> None:
        kept = [r for r in self.records() if r.get("round", 0) <= round_index]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._purge_step = round_index + 1

    def append(self, record: dict[str, Any]) -> None:
        append_text(self.path, json.dumps(record) + "\n")
        if self.tensorboard:
            self._scalars(record)

    def _scalars(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            # Imported on first use: TensorBoard's import costs about a second at start-up.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.directory), purge_step=self._purge_step)
        step = record.get("round", 0)
        with output_errors(self.directory):
            for key, value in record.items():
                if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
