"""The strategy interface: what a federated method may change in the one round loop (:mod:`mllmfl_dist.fl.trainer`).

A strategy is built once per run (:func:`mllmfl_dist.fl.strategies.build_strategy`) from
:class:`StrategyArgs` (the ``[federated]`` section, the run's seed) and the config sections it declares in
``sections``, each passed to the constructor under its section's name::

    class CReFF(FedAvg):
        name = "creff"
        sections = {"creff": CreffConfig}

        def __init__(self, args: StrategyArgs, creff: CreffConfig): ...

Besides the model, strategies exchange *named tensors* with the trainer, which packs them into the round's
two flat buffers (:class:`mllmfl_dist.fl.aggregation.FlatLayout`): what each client uploads is summed by the
round's one all_reduce, and server state every rank needs rides in the round's one broadcast. Per-client state
lives on rank 0 (:mod:`mllmfl_dist.fl.client_state`); the broadcast before a round carries its sampled clients'
entries and each client's new entry returns in its own slot of the all_reduce, so no rank keeps any.

The hooks, by the phase they belong to; each has a default that leaves the round as plain FedAvg would have it
(except :meth:`Strategy.update_global_model`, whose default is the clients' weighted mean itself):

set-up, once per run
  ``check_config(cfg)``    classmethod, when the config loads: refuse what the strategy cannot run (ConfigError)
  ``models(sections)``     classmethod: the pretrained models its sections name (for tables and reports)
  ``projection_dim(feature_dim)``   width of a projection the FL model needs before its classifier (0: none)
  ``setup(context)``       every rank, before the first round it trains (CLIP2FL's teacher pass)
  ``setup_summary()``      rank 0, after setup: numbers for the run's summary and tracker (CLIP2FL's teacher)
on a client host, for each of its sampled clients (the model is the round's global model at first)
  ``upload_shapes(model)``              the named float64 tensors each client adds to the all_reduce
  ``client_state_shapes(model)``        the named tensors each client keeps between its rounds (SCAFFOLD's c_i),
                                        in the per-client store (:mod:`mllmfl_dist.fl.client_state`)
  ``client_upload(model, ...)``         this client's summands of them, before local training (CReFF's class
                                        gradients)
  ``start_client(model, client)``       before local training: ``client`` (:class:`ClientContext`) holds the
                                        client id, the round, its sample and step counts and its stored state
  ``local_loss_inputs(data, client)``   per-sample rows handed to the local loss (CLIP2FL's teacher logits)
  ``local_loss(model, logits, ...)``    the local objective (FedProx: plus its proximal term)
  ``finish_client(model, client, start, trained, trainable_mask)``   after local training: summands computed
                                        from the client's update and its new state (:class:`ClientUpdate`)
on the server (rank 0), after the all_reduce
  ``server_update(current, client_mean, trainable_mask, sums)``   the next global model, with the summed
                                        uploads (default: ``update_global_model``, which does not see them)
  ``update_global_model(current, client_mean, trainable_mask)``   the next global model
  ``process_uploads(model, sums, round)``    use the summed uploads; returns numbers for the round's log
with the round's broadcast, on every rank
  ``broadcast_state(model)``   named server state every rank needs (CReFF's re-trained classifier)
  ``receive_state(tensors)``   take rank 0's
results and checkpoints
  ``evaluation_model(model)``, ``state_dict()`` / ``load_state_dict(state)``, ``divergence_hints(where)``
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import nn

from mllmfl_dist.core.errors import ConfigError
from mllmfl_dist.config import FederatedConfig
from mllmfl_dist.core import dist
from mllmfl_dist.data import ClientData

if TYPE_CHECKING:
    from mllmfl_dist.config import Config
    from mllmfl_dist.fl.client import LocalTraining

Shapes = dict[str, tuple[int, ...]]
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StrategyArgs:
    """What every strategy is built with, besides its own config sections."""

    federated: FederatedConfig
    seed: int  # run.seed, for the strategy's own random streams (core/seeds.py)
    progress: bool = True  # whether rank 0 may show progress bars


@dataclass(frozen=True)
class StrategyContext:
    """What :meth:`Strategy.setup` may need: the ranks, the client data and a cache folder of the run."""

    runtime: dist.Runtime
    data: ClientData
    cache_dir: Path


@dataclass(frozen=True)
class ModelUse:
    """A pretrained model a strategy's config names: who uses it, the key that names it, and its kind."""

    role: str  # e.g. "CLIP2FL's CLIP"
    key: str  # e.g. "clip2fl.model"
    model: str
    pretrained: str = ""
    kind: str = ""  # "clip", "llava", ...: compare's +align[<kind>] rows may borrow it as their teacher


@dataclass(frozen=True)
class ClientContext:
    """What the client hooks know of the client they run for (:meth:`Strategy.start_client`,
    :meth:`Strategy.finish_client`)."""

    client_id: int
    round_index: int
    num_samples: int  # its training samples: the weight of its model in the round's mean
    local_steps: int  # the SGD steps its local training takes (batches of one sample are skipped)
    # Its entry in the per-client store as of its last round (the strategy's client_state_shapes, float32, on the
    # runtime's device; read-only), None if it never took part or the strategy keeps no client state.
    state: Tensors | None = None


@dataclass(frozen=True)
class ClientUpdate:
    """What :meth:`Strategy.finish_client` returns: ``uploads``, summands of some of :meth:`Strategy.upload_shapes`
    added to the round's all_reduce; ``state``, the client's new entry of :meth:`Strategy.client_state_shapes`
    (None: its entry stays as it was, and a client that had none gets none)."""

    uploads: Tensors = field(default_factory=dict)
    state: Tensors | None = None


# The hooks through which a strategy sends, keeps or uses more than the clipped, noised model mean: a strategy
# that overrides one is outside central DP's guarantee unless it (or a subclass of the overriding class) declares
# ``dp_compatible`` itself.
DP_SENSITIVE_HOOKS = ("upload_shapes", "client_state_shapes", "server_update", "process_uploads")


def _defined_in(cls: type, name: str) -> type[Strategy]:
    """The class in ``cls``'s MRO whose own body sets ``name`` (:class:`Strategy` when none does): who vouches
    for a declaration such as ``dp_compatible``, or who wrote a hook."""
    return cast(type[Strategy], next((k for k in cls.__mro__ if name in vars(k)), Strategy))


def dp_refusal(cls: type) -> str | None:
    """Why central DP (:mod:`mllmfl_dist.fl.dp`) cannot run with strategy class ``cls`` (None: it can): it
    declares ``dp_compatible = False``, or it overrides one of :data:`DP_SENSITIVE_HOOKS` below the class whose
    ``dp_compatible`` it inherits (a plug-in subclassing FedAvg and replacing ``server_update`` has not said
    whether that step stays inside the guarantee, so it is taken as not)."""
    declared = _defined_in(cls, "dp_compatible")
    if not declared.dp_compatible:
        return "its uploads go beyond the clipped model update, outside the privacy guarantee"
    for hook in DP_SENSITIVE_HOOKS:
        owner = _defined_in(cls, hook)
        if owner is not Strategy and (declared is Strategy or not issubclass(declared, owner)):
            return (
                f"{owner.__qualname__} overrides {hook} without declaring dp_compatible (set dp_compatible = "
                f"True on it only if that hook adds nothing outside the clipped, noised model mean)"
            )
    return None


# The hooks that shape a client's local training: a strategy that overrides one can run vectorized clients
# (``federated.vectorize``, :mod:`mllmfl_dist.fl.vectorized`) only if the class that declares ``vectorizable``
# wrote it (or is below the class that did), since vectorized clients call none of them but ``local_penalty``.
CLIENT_HOOKS = (
    "upload_shapes",
    "client_state_shapes",
    "client_upload",
    "start_client",
    "finish_client",
    "local_loss_inputs",
    "local_loss",
    "local_penalty",
)


def vectorize_refusal(cls: type) -> str | None:
    """Why vectorized clients cannot train for strategy class ``cls`` (None: they can): it does not declare
    ``vectorizable = True``, or it overrides one of :data:`CLIENT_HOOKS` below the class that declared it."""
    declared = _defined_in(cls, "vectorizable")
    for hook in CLIENT_HOOKS:
        owner = _defined_in(cls, hook)
        if owner is not Strategy and (not declared.vectorizable or not issubclass(declared, owner)):
            return f"{owner.__qualname__} overrides {hook}, which vectorized clients do not run"
    if not declared.vectorizable:
        return f"{declared.__qualname__} does not declare vectorizable = True"
    return None


class Strategy:
    name: ClassVar[str] = "base"
    # Whether the strategy uploads nothing but the model update, so central DP's clipping and noise cover all it
    # sends (SCAFFOLD's control deltas and FedNova's step counts are not covered). Only a class's own declaration
    # vouches for the hooks it overrides: see :func:`dp_refusal`.
    dp_compatible: ClassVar[bool] = True
    # The config sections this strategy reads: {section name: frozen dataclass}; each is passed to the
    # constructor under its name, and is part of the resume check of a run with this strategy.
    sections: ClassVar[Mapping[str, type]] = {}
    # Whether local_loss reads the round's global parameters (the trainer keeps a copy only when it does).
    reads_global_params: ClassVar[bool] = False
    # Whether a host may train several of its clients at once as one stacked model (federated.vectorize): true
    # where local training is cross-entropy plus :meth:`local_penalty` and the client hooks do nothing else.
    # Only a class's own declaration vouches for the hooks it overrides: see :func:`vectorize_refusal`.
    vectorizable: ClassVar[bool] = False

    def __init__(self, args: StrategyArgs):
        self.args = args

    # -- set-up ------------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Refuse (ConfigError) a config this strategy cannot run; called when a config naming it loads."""

    @classmethod
    def check_dp(cls, cfg: Config) -> None:
        """Refuse (ConfigError, one line) central DP with this strategy (:func:`dp_refusal`) or with settings no
        accountant can run (:func:`mllmfl_dist.fl.dp.check_settings`). The config loader calls it through the
        registry's class when ``dp.enabled``, on every rank, so no rank meets an accountant's error alone while
        the others wait for it."""
        from mllmfl_dist.fl.dp import check_settings  # dp-accounting is imported for DP runs only

        refusal = dp_refusal(cls)
        if refusal:
            raise ConfigError(f"dp.enabled = true is not allowed with federated.strategy = {cls.name!r}: {refusal}")
        fed = cfg.federated
        check_settings(cfg.dp, fed.num_clients, fed.clients_per_round, fed.rounds)

    @classmethod
    def check_vectorize(cls, cfg: Config) -> None:
        """Refuse (ConfigError, one line naming the strategy) ``federated.vectorize > 1`` with a strategy whose
        local training vectorized clients cannot run (:func:`vectorize_refusal`)."""
        refusal = vectorize_refusal(cls)
        if refusal:
            raise ConfigError(
                f"federated.vectorize = {cfg.federated.vectorize} is not allowed with federated.strategy = "
                f"{cls.name!r}: {refusal}; set federated.vectorize = 1 (clients one after another)"
            )

    @classmethod
    def models(cls, sections: Mapping[str, Any]) -> list[ModelUse]:
        """The pretrained models this strategy's sections (``{name: dataclass instance}``) name."""
        return []

    def projection_dim(self, feature_dim: int) -> int:
        """Width of a linear projection the FL model needs between its pooled feature (``feature_dim`` wide)
        and its classifier (0: none). May load a model's config, so a missing model is refused before training."""
        return 0

    def setup(self, context: StrategyContext) -> None:
        """Once per run, on every rank, after the starting model is broadcast and before the first round."""

    def setup_summary(self) -> dict[str, Any]:
        """Rank 0, after :meth:`setup`: nested numbers describing what it made (CLIP2FL: its teacher's accuracy
        and confidence), written to ``federated/summary.json`` and logged once to the tracker."""
        return {}

    # -- on a client host ----------------------------------------------------------------------------
    def upload_shapes(self, model: nn.Module) -> Shapes:
        """The float64 tensors (name -> shape) each client adds to the round's all_reduce beside its model;
        their sums reach :meth:`process_uploads` on rank 0."""
        return {}

    def client_state_shapes(self, model: nn.Module) -> Shapes:
        """The float32 tensors (name -> shape) each client keeps from one of its rounds to its next, in the
        per-client store (:mod:`mllmfl_dist.fl.client_state`); they reach :meth:`start_client` as
        ``client.state`` and :meth:`finish_client` returns the new ones."""
        return {}

    def client_upload(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        local: LocalTraining,
        generator: torch.Generator,
        device: torch.device | str,
    ) -> Tensors:
        """This client's summands of :meth:`upload_shapes` (some or all of them), computed on the round's global
        ``model`` before local training (``local``: the run's normalisation and augmentation; ``generator``:
        seeded by (seed, round, client), the client's only source of randomness here)."""
        return {}

    def start_client(self, model: nn.Module, client: ClientContext) -> None:
        """Before ``client``'s local training (``model``: the round's global model); a strategy keeps here what
        :meth:`local_loss` needs of this client (its state), since a host trains its clients one at a time."""

    def finish_client(
        self,
        model: nn.Module,
        client: ClientContext,
        start: torch.Tensor,
        trained: torch.Tensor,
        trainable_mask: torch.Tensor,
    ) -> ClientUpdate:
        """After ``client``'s local training: summands for the all_reduce computed from its update and its new
        state. ``start`` / ``trained``: the global model before and the client's after (flat float64, the
        trainer's layout of ``model.state_dict()``); ``trainable_mask`` marks the trainable parameters' entries
        (in the order of ``model.parameters()``)."""
        return ClientUpdate()

    def local_loss_inputs(self, data: ClientData, client_id: int) -> torch.Tensor | None:
        """Per-sample rows (in the order of ``data.client(client_id)``) handed, batch by batch, to
        :meth:`local_loss` as ``inputs``."""
        return None

    def local_loss(
        self,
        model: nn.Module,
        logits: torch.Tensor,
        labels: torch.Tensor,
        global_params: Sequence[torch.Tensor],
        inputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of one local batch (``global_params``: the round's trainable parameters, when
        :attr:`reads_global_params`)."""
        return nn.functional.cross_entropy(logits, labels)

    def local_penalty(self, params: Tensors, global_params: Tensors) -> torch.Tensor | None:
        """For vectorized clients: the term :meth:`local_loss` adds to the cross-entropy, for ``g`` clients at once
        (``params``: each trainable parameter with a leading client axis [g, ...]; ``global_params``: the round's,
        without it); returns [g], or None for none."""
        return None

    # -- on the server ---------------------------------------------------------------------------------
    def server_update(
        self, current: torch.Tensor, client_mean: torch.Tensor, trainable_mask: torch.Tensor, sums: Tensors
    ) -> torch.Tensor:
        """The next global model (float64, flat) from the current one, the clients' weighted mean and the
        all-reduced uploads ``sums`` (SCAFFOLD, FedDyn, FedNova step with them). The default ignores ``sums``
        and calls :meth:`update_global_model`."""
        return self.update_global_model(current, client_mean, trainable_mask)

    def update_global_model(
        self, current: torch.Tensor, client_mean: torch.Tensor, trainable_mask: torch.Tensor
    ) -> torch.Tensor:
        """The next global model (float64, flat) from the current one and the clients' weighted mean;
        ``trainable_mask`` marks the trainable parameters' entries (the rest are buffers such as BatchNorm
        statistics)."""
        return client_mean.clone()

    def process_uploads(self, model: nn.Module, sums: Tensors, round_index: int) -> dict[str, float]:
        """Rank 0, after :meth:`update_global_model` (``model`` holds the new global model) and before the
        broadcast: use the all-reduced uploads. Returns numbers for the round's log."""
        return {}

    # -- with the broadcast ------------------------------------------------------------------------------
    def broadcast_state(self, model: nn.Module) -> Tensors:
        """Server state every rank needs, carried by the round's broadcast after the model. Called on every
        rank (its shapes size the buffer), rank 0's values are the ones sent."""
        return {}

    def receive_state(self, tensors: Tensors) -> None:
        """Every rank: take rank 0's :meth:`broadcast_state` (new tensors, float32, on the runtime's device)."""

    # -- results and checkpoints ----------------------------------------------------------------------------
    def evaluation_model(self, model: nn.Module) -> nn.Module:
        """What is evaluated and saved as the final model."""
        return model

    def state_dict(self) -> dict[str, Any]:
        """The server-side state a checkpoint keeps (a copy; tensors and plain containers only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (an empty dict: nothing saved yet)."""

    def divergence_hints(self, where: str) -> list[str]:
        """``key = value`` settings of this strategy to look at when a round went non-finite ``where``:
        ``"clients"`` (local training), ``"global_update"`` or ``"uploads"``."""
        return []
