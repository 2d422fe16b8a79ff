"""What every experiment-tracking sink receives: flat scalar dicts with a named step, and the run's config.

A record of the trainer (a line of ``metrics.jsonl`` or ``rounds.jsonl``, a DWP step) holds nested values:
``per_class`` lists, a ``before_align`` dict. :func:`flatten_scalars` turns it into ``name -> float`` with
``/``-separated names (``eval/per_class/T-shirt_top``, ``eval/before_align/acc``), the form TensorBoard,
Weights & Biases and MLflow all group by.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

# What MLflow accepts in a metric name (alphanumerics, _ - . space : /); the other sinks take it as well.
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. :/]")


class Sink(Protocol):
    """One tracking backend. Rank 0 only; a sink never raises into the training loop (the Tracker drops a
    sink that fails and says so once)."""

    name: str

    def log_config(self, config: Mapping[str, Any], text: str) -> None:
        """The resolved config: ``config`` flat (``section.key -> value``), ``text`` the TOML."""

    def log_scalars(self, scalars: Mapping[str, float], step: int, step_name: str) -> None:
        """Scalars at ``step`` of the axis ``step_name`` (``round`` or ``pretrain/step``)."""

    def close(self) -> None:
        """Flush and release the backend."""


def metric_name(name: str) -> str:
    """``name`` with characters a backend refuses replaced by ``_`` (``T-shirt/top`` stays readable)."""
    return _UNSAFE.sub("_", name)


def flatten_scalars(record: Mapping[str, Any], prefix: str = "", class_names: Sequence[str] = ()) -> dict[str, float]:
    """Finite numbers of ``record`` as ``{prefix + path: value}``: dicts recurse (``before_align/acc``), lists
    of numbers named ``per_class`` are spread over ``class_names`` (by index without names), booleans and
    strings are skipped, and so are NaN/inf (a group with no class is ``None`` in the JSONL)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_scalars(value, f"{name}/", class_names))
        elif isinstance(value, (list, tuple)) and key == "per_class":
            for index, item in enumerate(value):
                label = class_names[index] if index < len(class_names) else str(index)
                if _number(item):
                    out[metric_name(f"{name}/{label.replace('/', '_')}")] = float(item)
        elif _number(value):
            out[metric_name(name)] = float(value)
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
