"""CReFF: Classifier Re-training with Federated Features (Shang et al., IJCAI 2022), on top of FedAvg; its
maths are the pure functions of :mod:`mllmfl_dist.fl.federated_features`."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from mllmfl_dist.config.strategy_sections import CreffConfig
from mllmfl_dist.core.seeds import TAG_CREFF_FEATURES, TAG_CREFF_HEAD_INIT, TAG_CREFF_RETRAIN, generator
from mllmfl_dist.data import normalize
from mllmfl_dist.fl.strategies.dsa import dsa_siamese
from mllmfl_dist.fl import federated_features as ff
from mllmfl_dist.fl.strategies.base import Shapes, StrategyArgs, Tensors
from mllmfl_dist.fl.strategies.fedavg import FedAvg

if TYPE_CHECKING:
    from mllmfl_dist.fl.client import LocalTraining
    from mllmfl_dist.fl.models import FLModel

FEATURE_CHUNK = 256  # images per forward when a client computes features for its class gradients


def _fl_model(model: nn.Module) -> FLModel:
    """``model`` as the trainer's :class:`~mllmfl_dist.fl.models.FLModel` (its ``classifier`` and ``features``),
    the model every strategy hook receives."""
    return cast("FLModel", model)


class CReFF(FedAvg):
    """Classifier Re-training with Federated Features, on top of FedAvg.

    Two classifiers continue from round to round, as in the paper's released code: the FedAvg model (with
    its aggregated classifier) is what clients train locally, and the *re-trained* classifier ``[W~ | b~]``
    (a seeded random linear layer before round 1) is where the class gradients are taken. Each round:

    - every sampled client, besides local training, computes for each class it holds the gradient of the
      cross-entropy with respect to ``[W~ | b~]`` on features of the round's global backbone (frozen, eval
      mode), averaged over ``creff.batches_per_class`` random batches of ``creff.batch_size`` samples of the
      class, each augmented by DSA as released (``creff.dsa_strategy``, :mod:`mllmfl_dist.fl.strategies.dsa`); it
      uploads their sums (``class_gradients``, ``[C, C, D + 1]``) and the weights of the server's mean
      (``class_weights``, ``[C]``, ``creff.gradient_mean``), summed by the round's one all_reduce;
    - rank 0 moves the federated features (``features_per_class`` per class at the model's feature width,
      kept across rounds) for ``match_epochs`` SGD steps so that the gradients they produce at ``[W~ | b~]``
      match the aggregated ones, then trains a fresh linear classifier on them for ``crt_epochs``: the new
      ``[W~ | b~]`` (``head``), which the round's broadcast carries to every rank beside the FedAvg model.

    Evaluation (and ``model_final.pt``) is the FedAvg backbone with the re-trained classifier.
    """

    name = "creff"
    dp_compatible = False  # its class gradients are uploaded unclipped and without noise
    sections = {"creff": CreffConfig}

    def __init__(self, args: StrategyArgs, creff: CreffConfig):
        super().__init__(args)
        self.creff = creff
        self.features: torch.Tensor | None = None  # [C, features_per_class, D], rank 0
        self._feature_optimizer: torch.optim.SGD | None = None
        # The re-trained classifier [C, D + 1] ([W~ | b~]), the same on every rank after each broadcast.
        self.head: torch.Tensor | None = None
        self.rounds_retrained = 0

    def _ensure_head(self, model: nn.Module) -> torch.Tensor:
        if self.head is None:
            # nn.Linear's default init, drawn from (seed, tag): the same on every rank before round 1.
            classifier = _fl_model(model).classifier
            num_classes, dim = classifier.out_features, classifier.in_features
            bound = 1.0 / dim**0.5
            self.head = torch.empty(num_classes, dim + 1).uniform_(
                -bound, bound, generator=generator(self.args.seed, TAG_CREFF_HEAD_INIT)
            )
        return self.head

    # -- on a client host ----------------------------------------------------------------------------------
    def upload_shapes(self, model: nn.Module) -> Shapes:
        classifier = _fl_model(model).classifier
        num_classes, dim = classifier.out_features, classifier.in_features
        return {"class_gradients": (num_classes, num_classes, dim + 1), "class_weights": (num_classes,)}

    @torch.no_grad()
    def client_upload(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        local: LocalTraining,
        generator: torch.Generator,
        device: torch.device | str,
    ) -> Tensors:
        head = self._ensure_head(model)
        num_classes = head.shape[0]
        batches = ff.pick_class_batches(
            labels,
            num_classes,
            batch_size=self.creff.batch_size,
            batches=self.creff.batches_per_class,
            generator=generator,
        )
        positions = torch.cat([p for _, p in batches])
        x = normalize(images[positions.to(images.device)].to(device), local.mean, local.std)
        # As released: DSA on each normalised real batch, one operation per batch (its own draw).
        x = torch.cat(
            [dsa_siamese(part, self.creff.dsa_strategy, generator) for part in x.split([len(p) for _, p in batches])]
        )
        was_training = model.training
        model.eval()  # the frozen backbone: BatchNorm with the federation's statistics
        features = torch.cat([_fl_model(model).features(chunk).float() for chunk in x.split(FEATURE_CHUNK)])
        model.train(was_training)
        held = torch.bincount(labels.cpu(), minlength=num_classes)
        weights = held if self.creff.gradient_mean == "samples" else (held > 0).long()
        bounds = torch.tensor([0] + [len(p) for _, p in batches]).cumsum(0).tolist()
        pieces = [(c, features[bounds[i] : bounds[i + 1]]) for i, (c, _) in enumerate(batches)]
        head = head.to(features.device)
        sums = ff.class_gradient_sums(pieces, weights, head[:, :-1], head[:, -1])
        return {"class_gradients": sums, "class_weights": weights.double()}

    # -- on the server -----------------------------------------------------------------------------------------
    def process_uploads(self, model: nn.Module, sums: Tensors, round_index: int) -> dict[str, float]:
        head = self._ensure_head(model)
        num_classes, width = head.shape
        real, present = ff.mean_class_gradients(sums["class_gradients"].cpu(), sums["class_weights"].cpu())
        if self.features is None:
            self.features = torch.randn(
                num_classes,
                self.creff.features_per_class,
                width - 1,
                generator=generator(self.args.seed, TAG_CREFF_FEATURES),
            ).requires_grad_(True)
            self._feature_optimizer = torch.optim.SGD([self.features], lr=self.creff.lr_feature)
        assert self._feature_optimizer is not None  # made with the features, above or by load_state_dict
        match_loss = ff.match_federated_features(
            self.features,
            self._feature_optimizer,
            real,
            present,
            head[:, :-1],
            head[:, -1],
            self.creff.match_epochs,
            extra_loss=self.feature_extra_loss(),
        )
        retrained = ff.retrain_classifier(
            self.features,
            epochs=self.creff.crt_epochs,
            lr=self.creff.lr_crt,
            batch_size=self.creff.crt_batch_size,
            generator=generator(self.args.seed, TAG_CREFF_RETRAIN, round_index),
        )
        self.head = torch.cat([retrained.weight, retrained.bias[:, None]], dim=1).detach().cpu()
        self.rounds_retrained = round_index
        return {"match_loss": match_loss}

    def feature_extra_loss(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A term added to the gradient-matching loss of the federated features (CLIP2FL's contrast)."""
        return None

    # -- with the broadcast -------------------------------------------------------------------------------------
    def broadcast_state(self, model: nn.Module) -> Tensors:
        return {"head": self._ensure_head(model)}

    def receive_state(self, tensors: Tensors) -> None:
        self.head = tensors["head"].detach().cpu().float().clone()

    # -- results and checkpoints ----------------------------------------------------------------------------------
    def evaluation_model(self, model: nn.Module) -> nn.Module:
        if not self.rounds_retrained:  # before the first round: nothing re-trained yet
            return model
        assert self.head is not None  # a re-training round (or the checkpoint of one) set it
        evaluated = copy.deepcopy(model)
        with torch.no_grad():
            _fl_model(evaluated).classifier.weight.copy_(self.head[:, :-1])
            _fl_model(evaluated).classifier.bias.copy_(self.head[:, -1])
        return evaluated

    def divergence_hints(self, where: str) -> list[str]:
        if where == "uploads":
            return [f"creff.lr_feature = {self.creff.lr_feature:g}", f"creff.lr_crt = {self.creff.lr_crt:g}"]
        return super().divergence_hints(where)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": super().state_dict(),
            "features": None if self.features is None else self.features.detach().clone(),
            "feature_optimizer": (
                copy.deepcopy(self._feature_optimizer.state_dict()) if self._feature_optimizer is not None else None
            ),
            "head": None if self.head is None else self.head.clone(),
            "rounds_retrained": self.rounds_retrained,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        # "server_optimizer": the key checkpoints written before the strategy state was renamed used.
        super().load_state_dict(state["optimizer"] if "optimizer" in state else state["server_optimizer"])
        if state["features"] is not None:
            self.features = state["features"].clone().requires_grad_(True)
            self._feature_optimizer = torch.optim.SGD([self.features], lr=self.creff.lr_feature)
            if state["feature_optimizer"]:
                self._feature_optimizer.load_state_dict(state["feature_optimizer"])
        self.head = None if state["head"] is None else state["head"].clone()
        self.rounds_retrained = int(state["rounds_retrained"])
