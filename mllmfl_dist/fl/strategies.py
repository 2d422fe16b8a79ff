"""Strategies as a handful of hooks around one round loop (Flower-style).

- ``client_loss``: the local objective (FedProx adds its proximal term here, CLIP2FL its distillation,
  reading per-sample ``side`` information from ``client_side_info``);
- ``payload_numel`` / ``client_payload``: extra numbers each client adds to the round's one flat
  all_reduce, computed on the round's global model before local training (CReFF's per-class classifier
  gradients and counts); ``server_update`` receives their sum on rank 0 after the server step;
- ``server_step``: turns the clients' weighted mean into the next global model. As in FedOpt /
  pfl-research, the averaged delta ``global - mean`` is treated as a gradient for a server optimizer
  (plain SGD with lr 1 is FedAvg; with momentum, FedAvgM). Buffers such as BatchNorm statistics are not
  optimised: they take the weighted mean directly;
- ``evaluation_model``: what is evaluated and saved as the final model (CReFF: the global model with its
  re-trained classifier);
- ``prepare``: once per run on every rank before the first round (CLIP2FL's teacher logits);
- ``state_dict`` / ``load_state_dict``: the server's state (optimizer, federated features), for checkpoints.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mllmfl_dist import dist
from mllmfl_dist.config import Config, FederatedConfig
from mllmfl_dist.data import ClientData, normalize
from mllmfl_dist.fl import federated_features as ff
from mllmfl_dist.fl.losses import distillation_loss
from mllmfl_dist.fl.sampling import derive_seed

log = logging.getLogger(__name__)

TAG_CREFF_FEATURES = 21  # derive_seed stream of the federated features' initial values
TAG_CREFF_RETRAIN = 22  # ... of the re-trained classifier's init and batch order, per round


@dataclass(frozen=True)
class RunContext:
    """What ``Strategy.prepare`` may need: the run's config, ranks, data and a cache folder."""

    cfg: Config
    runtime: dist.Runtime
    data: ClientData
    cache_dir: Path


class Strategy:
    name = "base"

    def __init__(self, cfg: FederatedConfig, server_momentum: float = 0.0):
        self.server_lr = cfg.server_lr
        self.server_momentum = server_momentum
        self._weights: torch.Tensor | None = None
        self._optimizer: torch.optim.SGD | None = None
        self._pending_state: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> Strategy:
        return cls(cfg.federated)

    @classmethod
    def projection_dim(cls, cfg: Config) -> int:
        """Width of a projection the FL model needs before its classifier (0: none)."""
        return 0

    def prepare(self, context: RunContext) -> None:
        """Once per run, on every rank, before the first round."""

    # -- client side -------------------------------------------------------------------------------
    def client_side_info(self, data: ClientData, client_id: int) -> torch.Tensor | None:
        """Per-sample tensor (rows in the order of ``data.client(client_id)``) handed to ``client_loss``."""
        return None

    def client_loss(self, model: nn.Module, logits: torch.Tensor, labels: torch.Tensor,
                    global_params: Sequence[torch.Tensor], side: torch.Tensor | None = None) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, labels)

    @property
    def needs_global_params(self) -> bool:
        """Whether ``client_loss`` reads the round's global parameters (saves a copy when not)."""
        return False

    def payload_numel(self, model: nn.Module) -> int:
        """Entries each client adds to the round's flat all_reduce beside its model (0: none)."""
        return 0

    def client_payload(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       mean: Sequence[float], std: Sequence[float], generator: torch.Generator,
                       device: torch.device | str) -> torch.Tensor:
        """This client's float64 ``[payload_numel]`` summand, from the round's global ``model``."""
        raise NotImplementedError(f"{self.name} sends no payload")

    # -- server side -------------------------------------------------------------------------------
    def server_step(self, global_flat: torch.Tensor, mean_flat: torch.Tensor,
                    trainable_mask: torch.Tensor) -> torch.Tensor:
        """Next global model (float64 flat) from the current one and the clients' weighted mean."""
        current = global_flat[trainable_mask]
        if self._optimizer is None:
            self._weights = current.clone().requires_grad_(False)
            self._optimizer = torch.optim.SGD(
                [self._weights], lr=self.server_lr, momentum=self.server_momentum
            )
            if self._pending_state is not None:
                self._optimizer.load_state_dict(self._pending_state)
                self._pending_state = None
        # The global model may have moved since the last step (alignment, a resume): follow it.
        self._weights.copy_(current)
        self._weights.grad = current - mean_flat[trainable_mask]
        self._optimizer.step()
        new = mean_flat.clone()
        new[trainable_mask] = self._weights
        return new

    def server_update(self, model: nn.Module, start_state: dict[str, torch.Tensor], payload: torch.Tensor,
                      round_index: int) -> dict[str, float]:
        """Rank 0, after the round's broadcast, so that it overlaps the next round's client training: use the
        all-reduced payload and the round's starting global ``start_state``. ``model`` is the new global
        model, which this hook must not change (every rank holds it already). Returns numbers for the
        round's log."""
        return {}

    def evaluation_model(self, model: nn.Module) -> nn.Module:
        return model

    def state_dict(self) -> dict[str, Any]:
        """A copy (the optimizer's own dict shares its momentum tensors, which later steps mutate)."""
        if self._optimizer is None:
            return copy.deepcopy(self._pending_state or {})
        return copy.deepcopy(self._optimizer.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self._optimizer is None:
            self._pending_state = state
        else:
            self._optimizer.load_state_dict(state)


class FedAvg(Strategy):
    name = "fedavg"


class FedAvgM(Strategy):
    """FedAvg with server momentum (Hsu et al., 2019)."""

    name = "fedavgm"

    def __init__(self, cfg: FederatedConfig):
        super().__init__(cfg, server_momentum=cfg.server_momentum)


class FedProx(Strategy):
    """FedAvg with the proximal term ``mu / 2 * ||w - w_global||^2`` on the client (Li et al., 2020)."""

    name = "fedprox"

    def __init__(self, cfg: FederatedConfig):
        super().__init__(cfg)
        self.mu = cfg.prox_mu

    @property
    def needs_global_params(self) -> bool:
        return True

    def client_loss(self, model, logits, labels, global_params, side=None):
        loss = nn.functional.cross_entropy(logits, labels)
        if self.mu == 0:
            return loss
        params = [p for p in model.parameters() if p.requires_grad]
        proximal = sum((p - g).pow(2).sum() for p, g in zip(params, global_params))
        return loss + 0.5 * self.mu * proximal


class CReFF(Strategy):
    """Classifier Re-training with Federated Features (Shang et al., IJCAI 2022), on top of FedAvg.

    Each sampled client also sends, for every class it holds, the gradient of the cross-entropy with respect
    to the global classifier ``[W | b]`` on its features under the frozen global backbone, weighted by its
    class count (payload of the round's all_reduce). On the server, the federated features (``creff.
    features_per_class`` per class, at the model's feature width, kept across rounds) take ``match_epochs``
    SGD steps so that the gradients they produce under the round's starting classifier match the aggregated
    real ones (sum over rows of 1 - cos); a fresh linear classifier is then trained on them for
    ``crt_epochs``. As in the paper's released code, the re-trained classifier is what is evaluated (and
    saved as the final model), while the FedAvg model, with its aggregated classifier, continues into the
    next round: the clients' gradients are always taken at the federation's own classifier.

    Since nothing the clients receive depends on them, the matching runs after the round's broadcast (it
    overlaps the next round's client training), and the re-training only when a model is evaluated or
    saved, from that round's features and a generator seeded by (seed, round): the same classifier as
    re-training every round, without the cost in rounds that are not evaluated.
    """

    name = "creff"

    def __init__(self, cfg: Config):
        super().__init__(cfg.federated)
        self.creff = cfg.creff
        self.seed = cfg.run.seed
        self.features: torch.Tensor | None = None  # [C, features_per_class, D], rank 0
        self.features_round = 0  # the round whose matching produced them
        self._feature_optimizer: torch.optim.SGD | None = None
        self._pending_feature_optimizer: dict[str, Any] | None = None
        # The classifier re-trained on the features of ``features_round`` (weight, bias); None until needed.
        self.retrained: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> Strategy:
        return cls(cfg)

    # -- client side -------------------------------------------------------------------------------
    def payload_numel(self, model):
        num_classes, dim = model.classifier.out_features, model.classifier.in_features
        return num_classes * num_classes * (dim + 1) + num_classes

    @torch.no_grad()
    def client_payload(self, model, images, labels, mean, std, generator, device):
        num_classes = model.classifier.out_features
        batches = ff.pick_class_batches(labels, num_classes, batch_size=self.creff.batch_size,
                                        batches=self.creff.batches_per_class, generator=generator)
        # One forward over the picked samples, un-augmented, BatchNorm in eval mode: the frozen backbone.
        picked = torch.unique(torch.cat([positions for _, positions in batches]))
        row = torch.full((labels.shape[0],), -1, dtype=torch.long)
        row[picked] = torch.arange(len(picked))
        was_training = model.training
        model.eval()
        features = model.features(normalize(images[picked].to(device), mean, std)).float()
        model.train(was_training)
        counts = torch.bincount(labels.cpu(), minlength=num_classes)
        sums = ff.class_gradient_sums([(c, features[row[p].to(features.device)]) for c, p in batches], counts,
                                      model.classifier.weight, model.classifier.bias)
        return torch.cat([sums.flatten(), counts.double()])

    # -- server side -------------------------------------------------------------------------------
    def server_update(self, model, start_state, payload, round_index):
        num_classes, dim = model.classifier.out_features, model.classifier.in_features
        split = num_classes * num_classes * (dim + 1)
        real, present = ff.mean_class_gradients(payload[:split].view(num_classes, num_classes, dim + 1).cpu(),
                                                payload[split:].cpu())
        if self.features is None:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, TAG_CREFF_FEATURES))
            self.features = torch.randn(num_classes, self.creff.features_per_class, dim,
                                        generator=generator).requires_grad_(True)
            self._feature_optimizer = torch.optim.SGD([self.features], lr=self.creff.lr_feature)
            if self._pending_feature_optimizer is not None:
                self._feature_optimizer.load_state_dict(self._pending_feature_optimizer)
                self._pending_feature_optimizer = None
        match_loss = ff.match_federated_features(
            self.features, self._feature_optimizer, real, present, start_state["classifier.weight"].cpu(),
            start_state["classifier.bias"].cpu(), self.creff.match_epochs, extra_loss=self.feature_extra_loss())
        self.features_round, self.retrained = round_index, None
        return {"match_loss": match_loss}

    def retrained_classifier(self) -> dict[str, torch.Tensor] | None:
        """The classifier re-trained on the current federated features (computed once per round, on demand)."""
        if self.retrained is None and self.features is not None:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, TAG_CREFF_RETRAIN, self.features_round))
            head = ff.retrain_classifier(self.features, epochs=self.creff.crt_epochs, lr=self.creff.lr_crt,
                                         batch_size=self.creff.crt_batch_size, generator=generator)
            self.retrained = {"weight": head.weight.detach().clone(), "bias": head.bias.detach().clone()}
        return self.retrained

    def feature_extra_loss(self):
        """A term added to the gradient-matching loss of the federated features (CLIP2FL's contrast)."""
        return None

    def evaluation_model(self, model):
        retrained = self.retrained_classifier()
        if retrained is None:  # before the first round
            return model
        evaluated = copy.deepcopy(model)
        with torch.no_grad():
            evaluated.classifier.weight.copy_(retrained["weight"])
            evaluated.classifier.bias.copy_(retrained["bias"])
        return evaluated

    def state_dict(self):
        return {
            "server_optimizer": super().state_dict(),
            "features": None if self.features is None else self.features.detach().clone(),
            "features_round": self.features_round,
            "feature_optimizer": (copy.deepcopy(self._feature_optimizer.state_dict())
                                  if self._feature_optimizer is not None else self._pending_feature_optimizer),
            "retrained": copy.deepcopy(self.retrained),
        }

    def load_state_dict(self, state):
        if not state:
            return
        super().load_state_dict(state["server_optimizer"])
        if state["features"] is not None:
            self.features = state["features"].clone().requires_grad_(True)
            self._feature_optimizer = torch.optim.SGD([self.features], lr=self.creff.lr_feature)
            if state["feature_optimizer"]:
                self._feature_optimizer.load_state_dict(state["feature_optimizer"])
        self.features_round = int(state["features_round"])
        self.retrained = copy.deepcopy(state["retrained"])


class CLIP2FL(CReFF):
    """CLIP-guided FL on long-tailed data (Shi et al., AAAI 2024): CReFF plus a frozen CLIP.

    The FL model gains a projection from its pooled feature to the CLIP embedding width (its classifier and
    the federated features live there). Clients add ``clip2fl.alpha * T^2 * KL(softmax(t / T) ||
    softmax(s / T))`` to the cross-entropy, ``t`` the open_clip zero-shot logits of the un-augmented image
    (prompt templates, logit scale 100), computed once per sample and cached on disk
    (:mod:`mllmfl_dist.fl.clip2fl_teacher`). On the server the federated features minimise CReFF's
    gradient-matching loss plus ``contrast_alpha`` times a supervised contrast to the class text
    embeddings (temperature ``contrast_temperature``); the classifier is then re-trained as in CReFF.
    """

    name = "clip2fl"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.clip2fl = cfg.clip2fl
        self.progress = cfg.log.progress
        self.teacher = None  # TeacherLogits, after prepare

    @classmethod
    def projection_dim(cls, cfg):
        from mllmfl_dist.models.clip_teacher import clip_embed_dim

        return clip_embed_dim(cfg.clip2fl.model, cfg.clip2fl.pretrained)

    def prepare(self, context):
        from mllmfl_dist.fl.clip2fl_teacher import teacher_logits

        self.teacher = teacher_logits(self.clip2fl, context.data, context.runtime, context.cache_dir,
                                      progress=self.progress)

    def client_side_info(self, data, client_id):
        if self.teacher is None:
            raise RuntimeError("CLIP2FL.prepare() must run before the first round")
        return self.teacher.rows(data.client_indices(client_id))

    def client_loss(self, model, logits, labels, global_params, side=None):
        teacher = None if side is None else torch.softmax(side.to(logits.device) / self.clip2fl.temperature, dim=1)
        return distillation_loss(logits, labels, teacher, self.clip2fl.alpha, self.clip2fl.temperature)

    def feature_extra_loss(self):
        text = self.teacher.text_embeddings if self.teacher is not None else None
        if text is None or self.clip2fl.contrast_alpha == 0:
            return None
        weight, temperature = self.clip2fl.contrast_alpha, self.clip2fl.contrast_temperature
        return lambda features: weight * ff.text_contrast_loss(features, text, temperature)


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, FedAvgM, FedProx, CReFF, CLIP2FL)}


def build_strategy(cfg: Config) -> Strategy:
    return STRATEGIES[cfg.federated.strategy].from_config(cfg)
