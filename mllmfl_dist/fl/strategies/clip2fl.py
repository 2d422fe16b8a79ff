"""CLIP2FL: CLIP-guided FL on long-tailed data (Shi et al., AAAI 2024), CReFF plus a frozen CLIP."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from mllmfl_dist.core.errors import ConfigError
from mllmfl_dist.core.seeds import TAG_CLIP2FL_TEXT_PROJECTION, derive_seed
from mllmfl_dist.fl import federated_features as ff
from mllmfl_dist.fl.losses import distillation_loss
from mllmfl_dist.data import ArrayClientData, ClientData
from mllmfl_dist.fl.strategies.base import ModelUse, StrategyArgs, StrategyContext
from mllmfl_dist.fl.strategies.clip2fl_teacher import TeacherLogits, client_labels, teacher_logits
from mllmfl_dist.config.strategy_sections import Clip2flConfig, CreffConfig
from mllmfl_dist.fl.strategies.creff import CReFF
from mllmfl_dist.mllm.clip_teacher import clip_embed_dim
from mllmfl_dist.mllm.teacher_diagnostics import teacher_diagnostics

if TYPE_CHECKING:
    from mllmfl_dist.config import Config

log = logging.getLogger(__name__)


def text_projection(text_dim: int, feature_dim: int, seed: int) -> torch.Tensor:
    """A fixed ``[text_dim, feature_dim]`` float32 map with orthonormal rows (``feature_dim >= text_dim``: it
    keeps the text embeddings' lengths and angles) or orthonormal columns (``feature_dim < text_dim``): the QR
    factor of a Gaussian matrix drawn from ``derive_seed(seed, TAG_CLIP2FL_TEXT_PROJECTION)``, so the same
    seed gives the same map on every rank and resume. Not in the released code, whose feature and text widths
    are both 512."""
    generator = torch.Generator().manual_seed(derive_seed(seed, TAG_CLIP2FL_TEXT_PROJECTION))
    tall, short = max(text_dim, feature_dim), min(text_dim, feature_dim)
    gaussian = torch.randn(tall, short, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)  # q [tall, short], orthonormal columns
    q = q * torch.sign(torch.diagonal(r))[None, :]  # the unique QR with a positive diagonal of r
    return cast(torch.Tensor, (q if text_dim >= feature_dim else q.T).float().contiguous())


class CLIP2FL(CReFF):
    """CReFF plus a frozen CLIP.

    The FL model gains a linear projection from its pooled feature to ``clip2fl.projection_dim`` (default
    twice the feature width, as the released ResNet-8's ``add_mlp``); its classifier and the federated features
    live there. Clients add ``clip2fl.alpha * T^2 * KL(softmax(t / T) || softmax(s / T))`` to the
    cross-entropy, ``t`` the open_clip zero-shot logits ``scale * cos(image, text)`` of the un-augmented image
    (prompt templates; ``scale`` the model's own learned logit scale unless ``clip2fl.logit_scale`` sets one),
    computed once per sample and cached on disk (:mod:`mllmfl_dist.fl.strategies.clip2fl_teacher`). On the
    server the federated features minimise CReFF's gradient-matching loss plus ``contrast_alpha`` times a
    supervised contrast to the class text embeddings (temperature ``contrast_temperature``; through
    :func:`text_projection` where the widths differ); the classifier is then re-trained as in CReFF.
    """

    name = "clip2fl"
    sections = {"creff": CreffConfig, "clip2fl": Clip2flConfig}

    def __init__(self, args: StrategyArgs, creff: CreffConfig, clip2fl: Clip2flConfig):
        super().__init__(args, creff)
        self.clip2fl = clip2fl
        self.teacher: TeacherLogits | None = None  # after setup
        self._teacher_summary: dict[str, Any] = {}  # rank 0, after setup
        self._text: tuple[int, torch.Tensor] | None = None  # (feature width, text embeddings at that width)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if not cfg.section("clip2fl").model.strip():
            raise ConfigError(
                "federated.strategy = 'clip2fl' needs clip2fl.model (an open_clip architecture with "
                "clip2fl.pretrained, hf-hub:org/repo, or local-dir:DIR)"
            )
        if cfg.data.synthetic_mode != "array":
            raise ConfigError(
                "federated.strategy = 'clip2fl' caches teacher logits per training sample; it needs "
                "data.synthetic_mode = 'array'"
            )

    @classmethod
    def models(cls, sections: Mapping[str, Any]) -> list[ModelUse]:
        options = sections["clip2fl"]
        return [ModelUse("CLIP2FL's CLIP", "clip2fl.model", options.model, options.pretrained, kind="clip")]

    def projection_dim(self, feature_dim: int) -> int:
        clip_embed_dim(self.clip2fl.model, self.clip2fl.pretrained)  # refuses a missing model before training
        return self.clip2fl.projection_dim or 2 * feature_dim

    def setup(self, context: StrategyContext) -> None:
        data = cast(ArrayClientData, context.data)  # check_config requires data.synthetic_mode = 'array'
        self.teacher = teacher_logits(
            self.clip2fl, data, context.runtime, context.cache_dir, progress=self.args.progress
        )
        if context.runtime.is_server:
            # What the clients distil from: softmax(t / T) at the resolved scale, over every client sample.
            q = torch.softmax(self.teacher.logits / self.clip2fl.temperature, dim=1)
            stats = teacher_diagnostics(q, client_labels(data, self.teacher.indices))
            self._teacher_summary = {
                "logit_scale": self.teacher.logit_scale,
                "temperature": self.clip2fl.temperature,
                **stats,
            }
            log.info(
                "clip2fl teacher on the clients' %d samples at logit scale %.4g, T = %g: accuracy %.3f, mean "
                "entropy %.3f nats (uniform: %.3f), mean top probability %.3f",
                stats["samples"],
                self.teacher.logit_scale,
                self.clip2fl.temperature,
                stats["accuracy"],
                stats["mean_entropy_nats"],
                stats["max_entropy_nats"],
                stats["mean_top_probability"],
            )

    def setup_summary(self) -> dict[str, Any]:
        return {"clip2fl_teacher": self._teacher_summary} if self._teacher_summary else {}

    def local_loss_inputs(self, data: ClientData, client_id: int) -> torch.Tensor | None:
        if self.teacher is None:
            raise RuntimeError("CLIP2FL.setup() must run before the first round")
        return self.teacher.rows(cast(ArrayClientData, data).client_indices(client_id))

    def local_loss(
        self,
        model: nn.Module,
        logits: torch.Tensor,
        labels: torch.Tensor,
        global_params: Sequence[torch.Tensor],
        inputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        teacher = None if inputs is None else torch.softmax(inputs.to(logits.device) / self.clip2fl.temperature, dim=1)
        return distillation_loss(logits, labels, teacher, self.clip2fl.alpha, self.clip2fl.temperature)

    def feature_extra_loss(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        text = self.teacher.text_embeddings if self.teacher is not None else None
        if text is None or self.clip2fl.contrast_alpha == 0:
            return None
        weight, temperature = self.clip2fl.contrast_alpha, self.clip2fl.contrast_temperature
        return lambda features: weight * ff.text_contrast_loss(features, self._text_at(features.shape[-1]), temperature)

    def _text_at(self, width: int) -> torch.Tensor:
        """The class text embeddings ``[C, width]``, L2-normalised: as they are where ``width`` is the CLIP
        embedding width, else through :func:`text_projection` (computed once)."""
        # feature_extra_loss hands out the loss calling this only once the teacher has its text embeddings.
        assert self.teacher is not None and self.teacher.text_embeddings is not None
        text = self.teacher.text_embeddings
        if text.shape[1] == width:
            return text
        if self._text is None or self._text[0] != width:
            mapped = text.double() @ text_projection(text.shape[1], width, self.args.seed).double()
            self._text = (width, torch.nn.functional.normalize(mapped, dim=1).float())
        return self._text[1]

    def divergence_hints(self, where: str) -> list[str]:
        if where == "clients":
            return [f"clip2fl.alpha = {self.clip2fl.alpha:g}"]
        return super().divergence_hints(where)
