"""Augmentation and normalisation of whole uint8 batches as tensor ops (no per-sample loop, no PIL)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


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
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    batch, channels, height, width = images.shape
    out = images
    if random_crop and crop_padding > 0:
        pad = crop_padding
        offsets = torch.randint(0, 2 * pad + 1, (2, batch), generator=generator, device=generator.device)
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
    if hflip:
        flip = torch.rand(batch, generator=generator, device=generator.device) < 0.5
        out = torch.where(flip.to(images.device)[:, None, None, None], out.flip(-1), out)
    return out


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[..., C, H, W]`` -> float32 ``(x / 255 - mean) / std`` per channel."""
    channels = images.shape[-3]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries for {channels} channels")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(channels, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(channels, 1, 1)
    return (images.to(torch.float32) / 255.0 - mean_t) / std_t
