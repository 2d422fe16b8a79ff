"""Augmentation and normalisation of whole uint8 batches as tensor ops (no per-sample loop, no PIL)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def draw_augmentation(
    batch: int, generator: torch.Generator, crop_padding: int, hflip: bool, random_crop: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The random numbers of :func:`augment_batch` for ``batch`` samples, drawn from ``generator`` on its device:
    crop offsets int64 ``[2, batch]`` in ``[0, 2 * crop_padding]`` (rows, then columns; None without random crop
    or padding), then flips bool ``[batch]`` with probability 0.5 (None without ``hflip``)."""
    offsets = None
    if random_crop and crop_padding > 0:
        offsets = torch.randint(0, 2 * crop_padding + 1, (2, batch), generator=generator, device=generator.device)
    flips = torch.rand(batch, generator=generator, device=generator.device) < 0.5 if hflip else None
    return offsets, flips


def apply_augmentation(
    images: torch.Tensor, offsets: torch.Tensor | None, flips: torch.Tensor | None, crop_padding: int
) -> torch.Tensor:
    """Crop a uint8 ``[B, C, H, W]`` batch at ``offsets`` (``[2, B]``, into the image zero-padded by
    ``crop_padding``) and flip the samples where ``flips`` (``[B]``) holds; None skips either. The random numbers
    come from :func:`draw_augmentation`; they are moved to the images' device if they are elsewhere."""
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    batch, channels, height, width = images.shape
    out = images
    if offsets is not None:
        pad = crop_padding
        offsets = offsets.to(images.device)
        rows = offsets[0, :, None] + torch.arange(height, device=images.device)  # [B, H]
        cols = offsets[1, :, None] + torch.arange(width, device=images.device)  # [B, W]
        padded = F.pad(images, (pad, pad, pad, pad))
        out = padded[
            torch.arange(batch, device=images.device)[:, None, None, None],
            torch.arange(channels, device=images.device)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]
    if flips is not None:
        out = torch.where(flips.to(images.device)[:, None, None, None], out.flip(-1), out)
    return out


def augment_batch(
    images: torch.Tensor,
    generator: torch.Generator,
    crop_padding: int,
    hflip: bool,
    random_crop: bool = True,
) -> torch.Tensor:
    """Random crop with zero padding and/or random horizontal flip of a uint8 ``[B, C, H, W]`` batch.

    Each sample is shifted by its own offset in ``[0, 2 * crop_padding]`` per axis into the zero-padded
    image (torchvision's ``RandomCrop(size, padding)``) and flipped with probability 0.5. All random
    numbers come from ``generator`` (drawn on its device), so the output depends only on it and the input.
    """
    offsets, flips = draw_augmentation(images.shape[0], generator, crop_padding, hflip, random_crop)
    return apply_augmentation(images, offsets, flips, crop_padding)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[..., C, H, W]`` -> float32 ``(x / 255 - mean) / std`` per channel."""
    channels = images.shape[-3]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries for {channels} channels")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(channels, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(channels, 1, 1)
    return (images.to(torch.float32) / 255.0 - mean_t) / std_t
