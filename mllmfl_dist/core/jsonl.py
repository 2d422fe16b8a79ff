"""Metrics of a stage: one JSON object per line (the record the report, ``compare`` and resume read).

Experiment trackers (TensorBoard, W&B, MLflow) mirror these records' numbers: :mod:`mllmfl_dist.tracking`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mllmfl_dist.core.checkpoint import append_text, write_text_atomic


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
    """Appends JSON records to ``<dir>/<name>``.

    ``truncate_after(round)`` drops records of rounds that a resumed run is about to redo, so the file
    never holds two records for one round (the Tracker's TensorBoard sink purges their events likewise).
    """

    def __init__(self, directory: str | Path, name: str = "metrics.jsonl"):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / name

    def records(self) -> list[dict[str, Any]]:
        """The records; a last line torn by a job killed mid-write is dropped (its round is redone)."""
        return read_jsonl(self.path)

    def truncate_after(self, round_index: int) -> None:
        kept = [r for r in self.records() if r.get("round", 0) <= round_index]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict[str, Any]) -> None:
        append_text(self.path, json.dumps(record) + "\n")
