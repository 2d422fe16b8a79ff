"""CLIP2FL: CLIP-guided FL on long-tailed data (Shi et al., AAAI 2024), CReFF plus a frozen CLIP."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mllmfl_dist.core.errors import ConfigError
from mllmfl_dist.fl import federated_features as ff
from mllmfl_dist.fl.losses import distillation_loss
from mllmfl_dist.fl.strategies.base import ModelUse, StrategyArgs
from mllmfl_dist.fl.strategies.clip2fl_teacher import TeacherLogits, teacher_logits
from mllmfl_dist.config.strategy_sections import Clip2flConfig, CreffConfig
from mllmfl_dist.fl.strategies.creff import CReFF
from mllmfl_dist.models.clip_teacher import clip_embed_dim


class CLIP2FL(CReFF):
    """CReFF plus a frozen CLIP.

    The FL model gains a projection from its pooled feature to the CLIP embedding width (its classifier and
    the federated features live there). Clients add ``clip2fl.alpha * T^2 * KL(softmax(t / T) ||
    softmax(s / T))`` to the cross-entropy, ``t`` the open_clip zero-shot logits of the un-augmented image
    (prompt templates, logit scale 100), computed once per sample and cached on disk
    (:mod:`mllmfl_dist.fl.strategies.clip2fl_teacher`). On the server the federated features minimise CReFF's
    gradient-matching loss plus ``contrast_alpha`` times a supervised contrast to the class text
    embeddings (temperature ``contrast_temperature``); the classifier is then re-trained as in CReFF.
    """

    name = "clip2fl"
    sections = {"creff": CreffConfig, "clip2fl": Clip2flConfig}

    def __init__(self, args: StrategyArgs, creff: CreffConfig, clip2fl: Clip2flConfig):
        super().__init__(args, creff)
        self.clip2fl = clip2fl
        self.teacher: TeacherLogits | None = None  # after setup

    @classmethod
    def check_config(cls, cfg) -> None:
        if not cfg.section("clip2fl").model.strip():
            raise ConfigError("federated.strategy = 'clip2fl' needs clip2fl.model (an open_clip architecture with "
                              "clip2fl.pretrained, hf-hub:org/repo, or local-dir:DIR)")
        if cfg.data.synthetic_mode != "array":
            raise ConfigError("federated.strategy = 'clip2fl' caches teacher logits per training sample; it needs "
                              "data.synthetic_mode = 'array'")

    @classmethod
    def models(cls, sections: Mapping[str, Any]) -> list[ModelUse]:
        options = sections["clip2fl"]
        return [ModelUse("CLIP2FL's CLIP", "clip2fl.model", options.model, options.pretrained, kind="clip")]

    def projection_dim(self) -> int:
        return clip_embed_dim(self.clip2fl.model, self.clip2fl.pretrained)

    def setup(self, context):
        self.teacher = teacher_logits(self.clip2fl, context.data, context.runtime, context.cache_dir,
                                      progress=self.args.progress)

    def local_loss_inputs(self, data, client_id):
        if self.teacher is None:
            raise RuntimeError("CLIP2FL.setup() must run before the first round")
        return self.teacher.rows(data.client_indices(client_id))

    def local_loss(self, model, logits, labels, global_params, inputs=None):
        teacher = None if inputs is None else torch.softmax(inputs.to(logits.device) / self.clip2fl.temperature, dim=1)
        return distillation_loss(logits, labels, teacher, self.clip2fl.alpha, self.clip2fl.temperature)

    def feature_extra_loss(self):
        text = self.teacher.text_embeddings if self.teacher is not None else None
        if text is None or self.clip2fl.contrast_alpha == 0:
            return None
        weight, temperature = self.clip2fl.contrast_alpha, self.clip2fl.contrast_temperature
        return lambda features: weight * ff.text_contrast_loss(features, text, temperature)

    def divergence_hints(self, where: str) -> list[str]:
        if where == "clients":
            return [f"clip2fl.alpha = {self.clip2fl.alpha:g}"]
        return super().divergence_hints(where)
