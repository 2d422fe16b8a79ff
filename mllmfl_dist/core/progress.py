"""What rank 0 tells a person while a stage runs: tqdm bars on a terminal, plain log lines in a file.

Under SLURM or nohup stderr is a file, where a bar's carriage returns pile up into one unreadable line;
there the bars give way to one log line per evaluation (and per stage), which ``grep`` and ``tail`` read.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # core sits below config: the type only
    from mllmfl_dist.config import LogConfig


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def show_bars(log_cfg: LogConfig) -> bool:
    """tqdm bars only when ``log.progress`` is on and stderr is a terminal."""
    return log_cfg.progress and stderr_is_terminal()


def quiet_library_bars(rank: int) -> None:
    """Turn off the Hugging Face libraries' own bars (transformers' "Loading weights", hub downloads) on
    ranks other than 0, and on rank 0 when stderr is not a terminal. Must run before transformers is
    imported (it reads the switch once); a user's own setting of the variable wins."""
    if rank != 0 or not stderr_is_terminal():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _accuracy(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def evaluation_line(record: Mapping[str, Any], rounds: int, seconds_per_round: float) -> str:
    """``round 4/10: acc 0.4123 (many 0.5123, medium 0.2000, few -), val acc 0.4310, 1.23 s/round`` (val where
    the run has a validation split), plus the accuracy before alignment when the round aligned. ``acc`` is the
    balanced test accuracy, ``val acc`` the balanced validation accuracy."""
    val = f"val acc {record['val_acc']:.4f}, " if record.get("val_acc") is not None else ""
    line = (
        f"round {record['round']}/{rounds}: acc {record['acc']:.4f} (many {_accuracy(record.get('acc_many'))}, "
        f"medium {_accuracy(record.get('acc_medium'))}, few {_accuracy(record.get('acc_few'))}), {val}"
        f"{seconds_per_round:.2f} s/round"
    )
    before = record.get("before_align")
    if isinstance(before, Mapping) and before.get("acc") is not None:
        line += f"; before alignment acc {before['acc']:.4f}"
    return line
