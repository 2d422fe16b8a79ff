"""JSONL records (``metrics.jsonl``, ``rounds.jsonl``): one JSON object per line, appended as a stage goes, with
one reader and one policy for a damaged line.

The policy (:func:`read_jsonl`): records are read up to the first line that does not parse; that line (torn by
a job killed mid-write, or garbled by a power loss) and everything after it are dropped, since what follows a
damaged line is not trusted. A resumed stage redoes the rounds whose records were dropped. Experiment trackers
(TensorBoard, W&B, MLflow) mirror these records' numbers: :mod:`mllmfl_dist.tracking`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mllmfl_dist.core.checkpoint import append_text, write_text_atomic

log = logging.getLogger(__name__)

# The accuracies an evaluation record holds (balanced, top-1, and per group); the report and compare read them.
ACCURACY_KEYS = ("acc", "acc_top1", "acc_many", "acc_medium", "acc_few")
# ... and the same on the validation split (data.val_per_class), in records of runs that have one.
VAL_ACCURACY_KEYS = tuple(f"val_{key}" for key in ACCURACY_KEYS)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, up to the first line that does not parse; [] for a missing file."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    # errors="replace": bytes a power loss left garbled only spoil their own line, which then ends the read
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


def read_evaluations(path: str | Path) -> list[dict[str, Any]]:
    """The evaluation records (those with ``acc``) of a ``metrics.jsonl``, in round order, a redone round's
    last record kept; [] (with a warning) when the file cannot be read."""
    try:
        records = read_jsonl(path)
    except OSError as err:
        log.warning("cannot read %s: %s", path, err)
        return []
    by_round: dict[Any, dict[str, Any]] = {}
    for i, record in enumerate(records):
        if "acc" in record:
            by_round[record.get("round", f"line{i}")] = record
    evaluations = list(by_round.values())
    if all(isinstance(r.get("round"), (int, float)) for r in evaluations):
        evaluations.sort(key=lambda r: r["round"])
    return evaluations


class MetricsLog:
    """Appends JSON records to ``path`` (its folder is created).

    ``truncate_after(round)`` drops records of rounds that a resumed run is about to redo, so the file
    never holds two records for one round (the Tracker's TensorBoard sink purges their events likewise).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def records(self) -> list[dict[str, Any]]:
        """The records; a last line torn by a job killed mid-write is dropped (its round is redone)."""
        return read_jsonl(self.path)

    def truncate_after(self, round_index: int) -> None:
        kept = [r for r in self.records() if r.get("round", 0) <= round_index]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict[str, Any]) -> None:
        append_text(self.path, json.dumps(record) + "\n")
