"""Experiment tracking: TensorBoard, Weights & Biases and MLflow sinks behind one Tracker ([log] keys)."""

from mllmfl_dist.tracking.base import Sink, flatten_scalars
from mllmfl_dist.tracking.tracker import Tracker, check_trackers, open_tracker

__all__ = ["Sink", "Tracker", "check_trackers", "flatten_scalars", "open_tracker"]
