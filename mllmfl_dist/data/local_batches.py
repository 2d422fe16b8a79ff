"""One client's local batches, drawn before its first step: the rows and augmentation of every step.

Each client draws its data order and augmentation from a CPU generator of its own, so that the result does not
depend on which rank or device trains it. Drawn step by step, every step's few random numbers would cross to an
accelerator in a copy of their own, and a copy from pageable host memory makes the host wait for the device's
queue, step after step. Drawn up front, a client's whole plan crosses in one copy and no step waits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .augment import draw_augmentation


@dataclass(frozen=True)
class LocalBatch:
    """One local step: ``rows`` int64 ``[b]`` (positions in the client's data), crop ``offsets`` int64 ``[2, b]``
    and ``flips`` bool ``[b]`` for :func:`mllmfl_dist.data.augment.apply_augmentation` (None when off)."""

    rows: torch.Tensor
    offsets: torch.Tensor | None
    flips: torch.Tensor | None


def draw_local_batches(
    num_samples: int,
    batch_size: int,
    epochs: int,
    generator: torch.Generator,
    crop_padding: int,
    hflip: bool,
    random_crop: bool,
) -> list[LocalBatch]:
    """Every local step of a client with ``num_samples`` samples, in order: at each epoch a permutation, cut into
    batches of ``batch_size`` (the last one smaller), each batch's augmentation drawn after it. A batch of a
    single sample is skipped and draws nothing: BatchNorm cannot normalise one value per channel once the
    feature map is 1x1 (ResNet-50 on small images). The draws and their order are those of a loop calling
    :func:`mllmfl_dist.data.augment.augment_batch` step by step."""
    steps = []
    for _ in range(epochs):
        order = torch.randperm(num_samples, generator=generator)
        for start in range(0, num_samples, batch_size):
            rows = order[start : start + batch_size]
            if rows.numel() < 2:
                continue
            offsets, flips = draw_augmentation(rows.numel(), generator, crop_padding, hflip, random_crop)
            steps.append(LocalBatch(rows, offsets, flips))
    return steps


def pack(steps: list[LocalBatch]) -> torch.Tensor:
    """The steps as one int64 tensor ``[k, total samples]``: rows, then the two offset rows and the flips where
    the steps have them (all steps of a client have the same kinds)."""
    parts = [torch.cat([s.rows for s in steps])[None]]
    if steps[0].offsets is not None:
        parts.append(torch.cat([s.offsets for s in steps if s.offsets is not None], dim=1))
    if steps[0].flips is not None:
        parts.append(torch.cat([s.flips for s in steps if s.flips is not None]).long()[None])
    return torch.cat(parts)


def unpack(packed: torch.Tensor, sizes: list[int], offsets: bool, flips: bool) -> list[LocalBatch]:
    """The inverse of :func:`pack` for steps of ``sizes`` samples; views into ``packed``, on its device."""
    steps = []
    for column in packed.split(sizes, dim=1):
        step_offsets = column[1:3] if offsets else None
        step_flips = column[-1].bool() if flips else None
        steps.append(LocalBatch(column[0], step_offsets, step_flips))
    return steps


def to_device(steps: list[LocalBatch], device: torch.device | str) -> list[LocalBatch]:
    """``steps`` on ``device`` in one host-to-device copy; unchanged (no copy) on the CPU."""
    if not steps or torch.device(device).type == "cpu":
        return steps
    sizes = [s.rows.numel() for s in steps]
    moved = pack(steps).to(device)
    return unpack(moved, sizes, steps[0].offsets is not None, steps[0].flips is not None)
