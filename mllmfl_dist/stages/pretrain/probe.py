"""What DWP did to the backbone, in class terms: a linear probe (:mod:`mllmfl_dist.fl.probe`) of the final DWP
backbone and of the random initialisation DWP started from, on the server's labelled holdout, written into
``pretrain/metrics.json`` beside the held-out LM losses.

It runs at the end of every DWP stage on rank 0, so it is kept cheap: the probe trains on the server holdout
(``data.server_holdout_per_class`` per class) and is scored on the first :data:`TEST_PER_CLASS` images of each
class of the balanced test set (``python -m mllmfl_dist probe`` scores on all of it). Without a holdout (or
with a data source that has none) it is skipped, with the reason logged and recorded.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from mllmfl_dist.config import Config
from mllmfl_dist.fl.probe import RECIPE, linear_probe, pooled_features, probe_sets
from mllmfl_dist.stages.inputs import build_data, build_fl_model

log = logging.getLogger("mllmfl_dist.stages.pretrain")

TEST_PER_CLASS = 100
_KEYS = ("acc", "acc_top1", "val_acc", "val_acc_top1", "train_acc", "feature_dim", "n_train", "n_test", "converged")


def dwp_probe(
    cfg: Config, backbone_state: dict[str, torch.Tensor], device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """``{"train_set", "test_set", "recipe", "dwp": {...}, "random_init": {...}}`` (each: balanced ``acc``,
    ``acc_top1``, ``train_acc``, ``val_acc`` when the data has a validation set, ...), or ``{"skipped": reason}``.
    ``backbone_state``: ``FLModel.backbone_state_dict()`` of the trained backbone; the
    features are computed on ``device``."""
    data = build_data(cfg)
    try:
        sets = probe_sets(data, "holdout", test_per_class=TEST_PER_CLASS)
    except ValueError as err:
        reason = f"no labelled set to probe on ({err})"
        log.info("pretrain: linear probe skipped: %s", reason)
        return {"skipped": reason}
    # The init is the one build_student drew for this seed; the projection a strategy may add comes after the
    # backbone's parameters, so the backbone's values are the same without it.
    init = build_fl_model(cfg.model, data, cfg.run.seed).to(device)
    trained = build_fl_model(cfg.model, data, cfg.run.seed).to(device)
    trained.load_backbone_state_dict(backbone_state)
    out: dict[str, Any] = {
        "train_set": sets.train_name,
        "test_set": f"balanced test set, first {TEST_PER_CLASS} per class ({len(sets.test[1])} images)",
        "recipe": RECIPE,
    }
    try:
        for name, model in (("dwp", trained), ("random_init", init)):
            result = linear_probe(
                lambda images, m=model: pooled_features(m, images, data.mean, data.std, device=device), sets
            )
            out[name] = {k: result[k] for k in _KEYS if k in result}
    except ValueError as err:  # e.g. non-finite features of a diverged backbone: the stage's outputs still stand
        log.warning("pretrain: linear probe failed: %s", err)
        return {"skipped": f"the probe failed: {err}"}
    log.info(
        "pretrain: linear probe on the %s, balanced test accuracy: DWP backbone %.4f, random init %.4f",
        sets.train_name,
        out["dwp"]["acc"],
        out["random_init"]["acc"],
    )
    return out
