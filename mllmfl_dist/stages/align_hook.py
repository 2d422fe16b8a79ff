"""Stage 3 inside stage 2: rank 0's server hook of the round loop that aligns the global model every
``align.every`` rounds (:mod:`mllmfl_dist.stages.align`), evaluating it first in evaluated rounds so the metrics
hold accuracy before and after alignment."""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from mllmfl_dist.config import AlignConfig, Config
from mllmfl_dist.core import checkpoint
from mllmfl_dist.data import ClientData
from mllmfl_dist.core.jsonl import ACCURACY_KEYS
from mllmfl_dist.fl.evaluate import evaluate_on_splits
from mllmfl_dist.fl.models import FLModel
from mllmfl_dist.stages.align import align_model, build_alignment_set

log = logging.getLogger(__name__)


class AlignmentHook:
    """Built on rank 0 before the first round it aligns (it builds the alignment set and its teacher's
    distributions, cached under ``<run dir>/align/``, and describes the set in ``alignment_set.json``)."""

    def __init__(self, cfg: Config, data: ClientData, device: torch.device):
        self.cfg, self.data, self.device = cfg, data, device
        self.set = build_alignment_set(cfg, data, cache_dir=cfg.paths.align, device=device)
        self._records: dict[int, dict[str, Any]] = {}
        described = self.set.describe(cfg.align)
        # Kept beside the teacher cache, so a finished run's summary (and `compare`) can say what it used.
        checkpoint.write_text_atomic(cfg.paths.alignment_set, json.dumps(described, indent=2))
        accuracy, entropy = described["teacher_accuracy"], described["teacher_mean_entropy_nats"]
        scale = described["teacher_logit_scale"]
        log.info(
            "alignment set: %d images, %d with server-held labels (%s teacher%s%s%s)",
            described["images"],
            described["server_labeled_images"],
            cfg.align.teacher,
            "" if scale is None else f" at logit scale {scale:.4g}",
            "" if accuracy is None else f", accuracy {accuracy:.3f} on the set's labels",
            ""
            if entropy is None
            else f", mean entropy {entropy:.3f} nats (uniform: "
            f"{described['teacher_max_entropy_nats']:.3f}), mean top probability "
            f"{described['teacher_mean_top_probability']:.3f}",
        )
        self.described = described

    def __call__(self, model: FLModel, round_index: int) -> None:
        if round_index % self.cfg.align.every:
            return
        record: dict[str, Any] = {}
        if round_index % self.cfg.eval.every == 0 or round_index == self.cfg.federated.rounds:
            before = evaluate_on_splits(self.data, model, self.cfg.eval.batch_size, self.device)
            record["before_align"] = {
                k: before[k] for k in (*ACCURACY_KEYS, "per_class", "val_acc", "val_acc_top1") if k in before
            }
        record.update(
            align_model(
                model,
                self.set,
                self.cfg.align,
                self.data.mean,
                self.data.std,
                seed=self.cfg.run.seed,
                round_index=round_index,
                device=self.device,
            )
        )
        self._records[round_index] = record

    def divergence_hints(self) -> list[str]:
        return alignment_hints(self.cfg.align)

    def pop_round(self, round_index: int) -> dict[str, Any]:
        return self._records.pop(round_index, {})


def alignment_hints(align: AlignConfig) -> list[str]:
    """The settings to look at when alignment made the global model non-finite (every rank names them)."""
    return [f"align.lr = {align.lr:g}", f"align.beta = {align.beta:g}", f"align.steps = {align.steps}"]
