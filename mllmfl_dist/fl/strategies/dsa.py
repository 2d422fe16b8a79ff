"""Differentiable Siamese Augmentation (DSA), as CReFF and CLIP2FL apply it to the real batches behind a
client's class gradients.

Source: Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation" (ICML 2021), in the
form the released CReFF code (shangxinyi/CReFF-FL, ``Dataset/param_aug.py``) runs it: mode ``'S'`` (one
operation per batch, drawn uniformly from the strategy ``color_crop_cutout_flip_scale_rotate``) with
Siamese parameters (one draw per batch, shared by every image of it), on normalised float images, with
``ParamDiffAug``'s strengths (:class:`DSAParams`). ``color`` is three steps in a row (brightness,
saturation, contrast), each with its own draw.

Each operation is a pure function of the batch and its explicit parameters (so its effect is testable);
:func:`dsa_siamese` draws the operation and its parameters from a ``torch.Generator`` (seeded by the
caller from (seed, round, client)), never from the global RNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mllmfl_dist.config.strategy_sections import DSA_OPERATIONS, dsa_operations

# DSA_OPERATIONS: the operations this module implements; creff.dsa_strategy names some of them joined by '_'
# (the config's check reads the same tuple, so a value the config accepts is one this module runs).


@dataclass(frozen=True)
class DSAParams:
    """Strengths of the operations (the released ``ParamDiffAug`` defaults)."""

    prob_flip: float = 0.5
    ratio_scale: float = 1.2  # scale factors in [1 / ratio, ratio] per axis
    ratio_rotate: float = 15.0  # degrees, either way
    ratio_crop_pad: float = 0.125  # largest shift, as a fraction of the side (4 px at 32 px)
    ratio_cutout: float = 0.5  # side of the erased square, as a fraction of the image side
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


# -- the operations, on float [B, C, H, W] with explicit parameters ------------------------------------
def brightness(x: torch.Tensor, shift: float) -> torch.Tensor:
    """``x + shift`` (DSA draws ``shift = (u - 0.5) * brightness``; 0 is the identity)."""
    return x + shift


def saturation(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale each pixel's deviation from its channel mean by ``factor`` (1 is the identity; with one
    channel the mean is the pixel itself, so grey images are unchanged)."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * factor + mean


def contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale each image's deviation from its mean over channels and pixels by ``factor`` (1: identity)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor + mean


def translate(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift the content by ``dy`` rows and ``dx`` columns, filling with zeros (DSA's crop: pad and cut)."""
    height, width = x.shape[-2:]
    out = torch.zeros_like(x)
    if abs(dy) >= height or abs(dx) >= width:
        return out
    src_rows, dst_rows = slice(max(0, -dy), height - max(0, dy)), slice(max(0, dy), height - max(0, -dy))
    src_cols, dst_cols = slice(max(0, -dx), width - max(0, dx)), slice(max(0, dx), width - max(0, -dx))
    out[..., dst_rows, dst_cols] = x[..., src_rows, src_cols]
    return out


def cutout(x: torch.Tensor, top: int, left: int, size: tuple[int, int]) -> torch.Tensor:
    """Zero the ``size`` window whose top-left corner is (``top``, ``left``), clipped to the image."""
    out = x.clone()
    out[..., max(0, top) : max(0, top + size[0]), max(0, left) : max(0, left + size[1])] = 0
    return out


def flip(x: torch.Tensor, do: bool) -> torch.Tensor:
    """Mirror left-right when ``do``."""
    return x.flip(-1) if do else x


def affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample through the 2x3 affine ``theta`` (normalised coordinates; bilinear, zeros outside), as
    DSA's scale and rotate do with ``affine_grid`` / ``grid_sample``."""
    theta = theta.to(dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def scale_theta(sx: float, sy: float) -> torch.Tensor:
    return torch.tensor([[[sx, 0.0, 0.0], [0.0, sy, 0.0]]])


def rotate_theta(radians: float) -> torch.Tensor:
    c, s = math.cos(radians), math.sin(radians)
    return torch.tensor([[[c, -s, 0.0], [s, c, 0.0]]])


# -- drawing one operation and its parameters -------------------------------------------------------------
def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """An integer in [low, high)."""
    return int(torch.randint(low, high, (), generator=generator))


def apply_operation(
    x: torch.Tensor, name: str, generator: torch.Generator, params: DSAParams = DSAParams()
) -> torch.Tensor:
    """One DSA operation on the whole batch ``x`` (float ``[B, C, H, W]``), its parameters drawn once from
    ``generator`` and shared by every image (Siamese). Raises ValueError for an unknown ``name``."""
    height, width = x.shape[-2:]
    if name == "color":
        x = brightness(x, (_uniform(generator) - 0.5) * params.brightness)
        x = saturation(x, _uniform(generator) * params.saturation)
        return contrast(x, _uniform(generator) + params.contrast)
    if name == "crop":
        shift_y, shift_x = int(height * params.ratio_crop_pad + 0.5), int(width * params.ratio_crop_pad + 0.5)
        dy = _randint(-shift_y, shift_y + 1, generator)
        return translate(x, dy, _randint(-shift_x, shift_x + 1, generator))
    if name == "cutout":
        size = (int(height * params.ratio_cutout + 0.5), int(width * params.ratio_cutout + 0.5))
        # The released code draws the window's centre in [0, side + (1 - size % 2)).
        cy = _randint(0, height + (1 - size[0] % 2), generator)
        cx = _randint(0, width + (1 - size[1] % 2), generator)
        return cutout(x, cy - size[0] // 2, cx - size[1] // 2, size)
    if name == "flip":
        return flip(x, _uniform(generator) < params.prob_flip)
    if name == "scale":
        low = 1.0 / params.ratio_scale
        sx = _uniform(generator) * (params.ratio_scale - low) + low
        sy = _uniform(generator) * (params.ratio_scale - low) + low
        return affine(x, scale_theta(sx, sy))
    if name == "rotate":
        radians = (_uniform(generator) - 0.5) * 2 * params.ratio_rotate / 180 * math.pi
        return affine(x, rotate_theta(radians))
    raise ValueError(f"unknown DSA operation {name!r}; choose from {', '.join(DSA_OPERATIONS)}")


def dsa_siamese(
    x: torch.Tensor, strategy: str, generator: torch.Generator, params: DSAParams = DSAParams()
) -> torch.Tensor:
    """DSA in the released mode 'S': one operation of ``strategy`` (``'_'``-separated, e.g.
    ``"color_crop_cutout_flip_scale_rotate"``; ``"none"`` returns ``x``) drawn uniformly, applied to the
    whole float batch ``[B, C, H, W]`` with parameters shared by every image."""
    operations = dsa_operations(strategy)
    if not operations:
        return x
    name = operations[_randint(0, len(operations), generator)]
    return apply_operation(x, name, generator, params).contiguous()
