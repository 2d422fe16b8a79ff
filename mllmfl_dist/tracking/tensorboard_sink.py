"""TensorBoard: event files beside the stage's JSONL (``<run dir>/<stage>/events.out.tfevents.*``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


class TensorBoardSink:
    """``purge_step``: events at or after it, written by an interrupted run, are dropped when this one
    writes (a resumed run redoes those rounds)."""

    name = "tensorboard"

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        # Imported here: TensorBoard costs about a second of start-up and is not needed before the first scalar.
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log_config(self, config: Mapping[str, Any], text: str) -> None:
        from torch.utils.tensorboard.summary import hparams

        # The HPARAMS tab: every scalar config value; the metric it lists is the evaluation's balanced accuracy.
        values = {k: v for k, v in config.items() if isinstance(v, (bool, int, float, str))}
        experiment, start, end = hparams(values, {"eval/acc": float("nan")})
        for summary in (experiment, start, end):
            self._writer.file_writer.add_summary(summary)
        # Indented by four spaces: TensorBoard's text plugin renders Markdown, so the TOML shows verbatim.
        self._writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))
        self._writer.flush()

    def log_scalars(self, scalars: Mapping[str, float], step: int, step_name: str) -> None:
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
