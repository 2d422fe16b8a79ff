"""Strategies as a handful of hooks around one round loop (Flower-style).

- ``client_loss``: the local objective (FedProx adds its proximal term here, CLIP2FL its distillation,
  reading per-sample ``side`` information from ``client_side_info``);
- ``payload_numel`` / ``client_payload``: extra numbers each client adds to the round's one flat
  all_reduce, computed on the round's global model before local training (CReFF's per-class classifier
  gradients); ``server_update`` receives their sum on rank 0 after the server step;
- ``shared_numel`` / ``shared_state`` / ``load_shared_state``: server state every rank needs (CReFF's
  re-trained classifier), carried by the round's one broadcast after the model;
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

from mllmfl_dist.core import dist
from mllmfl_dist.config import Config, FederatedConfig
from mllmfl_dist.data import ClientData, normalize
from mllmfl_dist.data.dsa import dsa_siamese
from mllmfl_dist.fl import federated_features as ff
from mllmfl_dist.fl.losses import distillation_loss
from mllmfl_dist.fl.sampling import derive_seed
from mllmfl_dist.core.progress import show_bars

log = logging.getLogger(__name__)

TAG_CREFF_FEATURES = 21  # derive_seed stream of the federated features' initial values
TAG_CREFF_RETRAIN = 22  # ... of the re-trained classifier's init and batch order, per round
TAG_CREFF_HEAD_INIT = 24  # ... of the classifier the first round's class gradients are taken at
FEATURE_CHUNK = 256  # images per forward when a client computes features for its class gradients


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

    def client_payload(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, spec: Any,
                       generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
        """This client's float64 ``[payload_numel]`` summand, from the round's global ``model`` (``spec``: the
        run's ``LocalTraining``, for normalisation and augmentation)."""
        raise NotImplementedError(f"{self.name} sends no payload")

    def shared_numel(self, model: nn.Module) -> int:
        """Entries of server state every rank needs, carried by the round's broadcast after the model."""
        return 0

    def shared_state(self) -> torch.Tensor:
        """Rank 0: the ``[shared_numel]`` entries to broadcast."""
        raise NotImplementedError(f"{self.name} shares no state")

    def load_shared_state(self, flat: torch.Tensor) -> None:
        """Every rank: take the broadcast entries."""
        raise NotImplementedError(f"{self.name} shares no state")

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

    def server_update(self, model: nn.Module, payload: torch.Tensor, round_index: int) -> dict[str, float]:
        """Rank 0, after ``server_step`` (``model`` holds the new global model) and before the broadcast: use
        the all-reduced payload. Returns numbers for the round's log."""
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

    Two classifiers continue from round to round, as in the paper's released code: the FedAvg model (with
    its aggregated classifier) is what clients train locally, and the *re-trained* classifier ``[W~ | b~]``
    (a seeded random linear layer before round 1) is where the class gradients are taken. Each round:

    - every sampled client, besides local training, computes for each class it holds the gradient of the
      cross-entropy with respect to ``[W~ | b~]`` on features of the round's global backbone (frozen, eval
      mode), averaged over ``creff.batches_per_class`` random batches of ``creff.batch_size`` samples of the
      class, each augmented by DSA as released (``creff.dsa_strategy``, :mod:`mllmfl_dist.data.dsa`); these go
      into the round's one flat all_reduce (the payload after the model),
      with the weights of the server's mean (``creff.gradient_mean``);
    - rank 0 moves the federated features (``features_per_class`` per class at the model's feature width,
      kept across rounds) for ``match_epochs`` SGD steps so that the gradients they produce at ``[W~ | b~]``
      match the aggregated ones, then trains a fresh linear classifier on them for ``crt_epochs``: the new
      ``[W~ | b~]``, which the round's broadcast carries to every rank beside the FedAvg model.

    Evaluation (and ``model_final.pt``) is the FedAvg backbone with the re-trained classifier.
    """

    name = "creff"

    def __init__(self, cfg: Config):
        super().__init__(cfg.federated)
        self.creff = cfg.creff
        self.seed = cfg.run.seed
        self.features: torch.Tensor | None = None  # [C, features_per_class, D], rank 0
        self._feature_optimizer: torch.optim.SGD | None = None
        # The re-trained classifier [C, D + 1] ([W~ | b~]), the same on every rank after each broadcast.
        self.head: torch.Tensor | None = None
        self.rounds_retrained = 0

    @classmethod
    def from_config(cls, cfg: Config) -> Strategy:
        return cls(cfg)

    def _ensure_head(self, model: nn.Module) -> torch.Tensor:
        if self.head is None:
            # nn.Linear's default init, drawn from (seed, tag): the same on every rank before round 1.
            num_classes, dim = model.classifier.out_features, model.classifier.in_features
            generator = torch.Generator().manual_seed(derive_seed(self.seed, TAG_CREFF_HEAD_INIT))
            bound = 1.0 / dim**0.5
            self.head = torch.empty(num_classes, dim + 1).uniform_(-bound, bound, generator=generator)
        return self.head

    # -- state every rank holds ----------------------------------------------------------------------
    def shared_numel(self, model):
        return self._ensure_head(model).numel()

    def shared_state(self):
        return self.head.flatten()

    def load_shared_state(self, flat):
        self.head = flat.detach().cpu().float().view_as(self.head).clone()

    # -- client side -------------------------------------------------------------------------------
    def payload_numel(self, model):
        num_classes, dim = model.classifier.out_features, model.classifier.in_features
        return num_classes * num_classes * (dim + 1) + num_classes

    @torch.no_grad()
    def client_payload(self, model, images, labels, spec, generator, device):
        head = self._ensure_head(model)
        num_classes = head.shape[0]
        batches = ff.pick_class_batches(labels, num_classes, batch_size=self.creff.batch_size,
                                        batches=self.creff.batches_per_class, generator=generator)
        positions = torch.cat([p for _, p in batches])
        x = normalize(images[positions.to(images.device)].to(device), spec.mean, spec.std)
        # As released: DSA on each normalised real batch, one operation per batch (its own draw).
        x = torch.cat([dsa_siamese(part, self.creff.dsa_strategy, generator)
                       for part in x.split([len(p) for _, p in batches])])
        was_training = model.training
        model.eval()  # the frozen backbone: BatchNorm with the federation's statistics
        features = torch.cat([model.features(chunk).float() for chunk in x.split(FEATURE_CHUNK)])
        model.train(was_training)
        held = torch.bincount(labels.cpu(), minlength=num_classes)
        weights = held if self.creff.gradient_mean == "samples" else (held > 0).long()
        bounds = torch.tensor([0] + [len(p) for _, p in batches]).cumsum(0).tolist()
        pieces = [(c, features[bounds[i] : bounds[i + 1]]) for i, (c, _) in enumerate(batches)]
        head = head.to(features.device)
        sums = ff.class_gradient_sums(pieces, weights, head[:, :-1], head[:, -1])
        return torch.cat([sums.flatten(), weights.double()])

    # -- server side -------------------------------------------------------------------------------
    def server_update(self, model, payload, round_index):
        head = self._ensure_head(model)
        num_classes, width = head.shape
        split = num_classes * num_classes * width
        real, present = ff.mean_class_gradients(payload[:split].view(num_classes, num_classes, width).cpu(),
                                                payload[split:].cpu())
        if self.features is None:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, TAG_CREFF_FEATURES))
            self.features = torch.randn(num_classes, self.creff.features_per_class, width - 1,
                                        generator=generator).requires_grad_(True)
            self._feature_optimizer = torch.optim.SGD([self.features], lr=self.creff.lr_feature)
        match_loss = ff.match_federated_features(self.features, self._feature_optimizer, real, present,
                                                 head[:, :-1], head[:, -1], self.creff.match_epochs,
                                                 extra_loss=self.feature_extra_loss())
        generator = torch.Generator().manual_seed(derive_seed(self.seed, TAG_CREFF_RETRAIN, round_index))
        retrained = ff.retrain_classifier(self.features, epochs=self.creff.crt_epochs, lr=self.creff.lr_crt,
                                          batch_size=self.creff.crt_batch_size, generator=generator)
        self.head = torch.cat([retrained.weight, retrained.bias[:, None]], dim=1).detach().cpu()
        self.rounds_retrained = round_index
        return {"match_loss": match_loss}

    def feature_extra_loss(self):
        """A term added to the gradient-matching loss of the federated features (CLIP2FL's contrast)."""
        return None

    def evaluation_model(self, model):
        if not self.rounds_retrained:  # before the first round: nothing re-trained yet
            return model
        evaluated = copy.deepcopy(model)
        with torch.no_grad():
            evaluated.classifier.weight.copy_(self.head[:, :-1])
            evaluated.classifier.bias.copy_(self.head[:, -1])
        return evaluated

    def state_dict(self):
        return {
            "server_optimizer": super().state_dict(),
            "features": None if self.features is None else self.features.detach().clone(),
            "feature_optimizer": (copy.deepcopy(self._feature_optimizer.state_dict())
                                  if self._feature_optimizer is not None else None),
            "head": None if self.head is None else self.head.clone(),
            "rounds_retrained": self.rounds_retrained,
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
        self.head = None if state["head"] is None else state["head"].clone()
        self.rounds_retrained = int(state["rounds_retrained"])


class CLIP2FL(CReFF):
    """CLIP-guided FL on long-tailed data (Shi et al., AAAI 2024): CReFF plus a frozen CLIP.

    The FL model gains a projection from its pooled feature to the CLIP embedding width (its classifier and
    the federated features live there). Clients add ``clip2fl.alpha * T^2 * KL(softmax(t / T) ||
    softmax(s / T))`` to the cross-entropy, ``t`` the open_clip zero-shot logits of the un-augmented image
    (prompt templates, logit scale 100), computed once per sample and cached on disk
    (:mod:`mllmfl_dist.fl.strategies.clip2fl_teacher`). On the server the federated features minimise CReFF's
    gradient-matching loss plus ``contrast_alpha`` times a supervised contrast to the class text
    embeddings (temperature ``contrast_temperature``); the classifier is then re-trained as in CReFF.
    """

    name = "clip2fl"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.clip2fl = cfg.clip2fl
        self.progress = show_bars(cfg.log)
        self.teacher = None  # TeacherLogits, after prepare

    @classmethod
    def projection_dim(cls, cfg):
        from mllmfl_dist.models.clip_teacher import clip_embed_dim

        return clip_embed_dim(cfg.clip2fl.model, cfg.clip2fl.pretrained)

    def prepare(self, context):
        from mllmfl_dist.fl.strategies.clip2fl_teacher import teacher_logits

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
