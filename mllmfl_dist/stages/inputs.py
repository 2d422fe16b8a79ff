"""What the stages start from: the run's client data, the FL model (built alike by DWP, federated finetuning
and ``evaluate``) and the pretrained backbone that finetuning may start from."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from mllmfl_dist.config import Config, ConfigError, ModelConfig
from mllmfl_dist.core import checkpoint, dist
from mllmfl_dist.core.locks import exclusive
from mllmfl_dist.core.seeds import TAG_MODEL_INIT, derive_seed
from mllmfl_dist.data import ClientData, DataError, build_client_data
from mllmfl_dist.data.sources import CIFAR_DEFAULT_ROOT
from mllmfl_dist.fl.models import FLModel, build_model

log = logging.getLogger(__name__)


def build_data(cfg: Config, runtime: dist.Runtime | None = None) -> ClientData:
    """The run's client data. With ``data.download`` on, rank 0 loads (downloads) first and the other ranks
    follow one at a time per data.root (a lock file in it): where data.root is local to each node, the
    first rank of another node downloads there while that node's other ranks wait, so several ranks never
    write the same download at once, whether or not the nodes share the folder."""

    def build() -> ClientData:
        return build_client_data(cfg.data, cfg.partition, cfg.federated.num_clients, cfg.run.seed)

    if runtime is None or not (runtime.distributed and cfg.data.download):
        return build()
    # Rank 0's outcome reaches every rank, so a failed download ends them all with its message.
    data = dist.server_first(runtime, build, "rank 0 to load the data first", catch=(ConfigError, DataError))
    if data is not None:
        return data
    root = Path(cfg.data.root or CIFAR_DEFAULT_ROOT).expanduser()  # where load_cifar downloads with root empty
    with exclusive(root / ".mllmfl_download.lock"):
        return build()


def build_fl_model(
    model_cfg: ModelConfig, data: ClientData, seed: int, projection_dim: Callable[[int], int] | None = None
) -> FLModel:
    """The FL model for ``data``, initialised from (seed, TAG_MODEL_INIT) on a forked RNG (the global one is
    left as it was), with a projection before the classifier when a strategy needs one: ``projection_dim``
    (a strategy's) maps the backbone's pooled feature width to the projection's width (0: none)."""
    in_channels = model_cfg.in_channels or data.in_channels
    if in_channels != data.in_channels:
        raise ConfigError(
            f"model.in_channels = {model_cfg.in_channels} does not match the data's {data.in_channels} "
            f"channels; set it to {data.in_channels} or 0"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, TAG_MODEL_INIT))
        model = build_model(
            model_cfg.arch, in_channels, data.num_classes, model_cfg.width_scale, channels_last=model_cfg.channels_last
        )
        width = projection_dim(model.feature_dim) if projection_dim is not None else 0
        return model.add_projection(width) if width else model


def pretrained_backbone_path(cfg: Config) -> Path:
    if cfg.model.pretrained_backbone == "pretrain":
        return cfg.paths.backbone
    return Path(cfg.model.pretrained_backbone)


def load_pretrained_backbone(cfg: Config, model: FLModel) -> None:
    """Rank 0 loads the backbone (the classifier stays new); the first broadcast hands it to all."""
    path = pretrained_backbone_path(cfg)
    if not path.is_file():
        raise ConfigError(
            f"model.pretrained_backbone: {path} does not exist; run the pretrain stage first "
            f"or point the key at a backbone state dict"
        )
    try:
        model.load_backbone_state_dict(checkpoint.load_or_explain(path, "model.pretrained_backbone"))
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"model.pretrained_backbone: {path} does not fit {cfg.model.arch}: {err}") from None
    log.info("federated finetuning starts from the pretrained backbone %s", path)
