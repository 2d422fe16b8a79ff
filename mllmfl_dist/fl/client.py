"""One client's local training: SGD over its data, batches augmented as whole tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from mllmfl_dist.config import DataConfig, FederatedConfig
from mllmfl_dist.data import apply_augmentation, normalize
from mllmfl_dist.data.local_batches import draw_local_batches, to_device

if TYPE_CHECKING:
    from mllmfl_dist.fl.strategies import Strategy


@dataclass(frozen=True)
class LocalTraining:
    """What every client of a run does locally; built once from the config and the data's statistics."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    random_crop: bool
    crop_padding: int
    hflip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, fed: FederatedConfig, data: DataConfig, mean: Sequence[float], std: Sequence[float]) -> LocalTraining:
        return cls(
            fed.local_epochs,
            fed.batch_size,
            fed.lr,
            fed.momentum,
            fed.weight_decay,
            data.random_crop,
            data.crop_padding,
            data.hflip,
            tuple(mean),
            tuple(std),
        )


def local_steps(num_samples: int, spec: LocalTraining) -> int:
    """The SGD steps :func:`train_client` takes on ``num_samples`` samples (its batches of one are skipped)."""
    full, rest = divmod(num_samples, spec.batch_size)
    return spec.epochs * ((full if spec.batch_size >= 2 else 0) + (1 if rest >= 2 else 0))


def normalizing_weight(steps: int, momentum: float) -> float:
    """``||a||_1`` of ``steps`` local SGD steps with momentum ``rho`` (heavy ball, no dampening, as
    :func:`train_client` takes them): the update is ``lr * sum_s a_s g_s`` with ``a_s = (1 - rho^(steps - s + 1))
    / (1 - rho)``, whose sum is ``steps`` without momentum, else ``(steps - rho (1 - rho^steps) / (1 - rho)) /
    (1 - rho)`` (FedNova, Wang et al. NeurIPS 2020, Section 4 / Appendix on momentum SGD). Weight decay adds to
    each ``g_s`` and leaves the ``a_s`` as they are."""
    if momentum == 0.0:
        return float(steps)
    return (steps - momentum * (1.0 - momentum**steps) / (1.0 - momentum)) / (1.0 - momentum)


def local_optimizer(model: nn.Module, spec: LocalTraining) -> torch.optim.SGD:
    """The clients' SGD over ``model``'s parameters; :func:`train_client` clears its state before each client."""
    return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)


def train_client(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    spec: LocalTraining,
    generator: torch.Generator,
    strategy: Strategy,
    global_params: Sequence[torch.Tensor] = (),
    device: torch.device | str = "cpu",
    inputs: torch.Tensor | None = None,
    optimizer: torch.optim.SGD | None = None,
) -> float:
    """Train ``model`` in place on one client's uint8 images (``inputs``: optional per-sample rows, such as
    teacher logits, that the strategy's loss reads batch by batch). Returns the training loss (the
    strategy's, e.g. with FedProx's term) averaged over every sample of every local step, NaN if no step ran.

    Data order and augmentation draw only from ``generator`` (seeded by seed, round and client id), so
    the result does not depend on which rank runs the client. A batch of a single sample is skipped
    (BatchNorm cannot normalise one value per channel once the feature map is 1x1, as in ResNet-50 on
    small images), so a one-sample client returns the global model, with its weight of 1.

    ``optimizer``: :func:`local_optimizer` of this ``model``, reused across clients (its state, the momentum
    buffers, is cleared here, so it steps as a new one would); None builds one.
    """
    model.train()
    if optimizer is None:
        optimizer = local_optimizer(model, spec)
    optimizer.state.clear()
    images = images.to(device)
    labels = labels.to(device)
    inputs = inputs.to(device) if inputs is not None else None
    # Every step's rows and augmentation, drawn up front and moved to the device in one copy: no step waits.
    steps = to_device(
        draw_local_batches(
            labels.shape[0], spec.batch_size, spec.epochs, generator, spec.crop_padding, spec.hflip, spec.random_crop
        ),
        device,
    )
    # Summed on the device and read once at the end: no host sync per step.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    for step in steps:
        x = normalize(
            apply_augmentation(images[step.rows], step.offsets, step.flips, spec.crop_padding), spec.mean, spec.std
        )
        loss = strategy.local_loss(
            model, model(x), labels[step.rows], global_params, inputs[step.rows] if inputs is not None else None
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        b = step.rows.numel()
        loss_sum += loss.detach().double() * b
        seen += b
    return float(loss_sum) / seen if seen else float("nan")
