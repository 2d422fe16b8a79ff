"""Dynamic Weighted Pretraining (DWP, stage 1b): the pieces of the method, free of the training loop.

LLaVA's CLIP vision tower ``g``, projector ``W`` and language model stay frozen. The FL backbone ``g_fl``
plus an adapter ``A`` (:class:`TokenAdapter`) is trained with the LLM's next-token loss on captions, on the
mixed visual tokens

    v = alpha(t) * A(g_fl(x_fl)) + (1 - alpha(t)) * g(x_clip)

where ``alpha`` rises from ``alpha_start`` to 1 (:func:`alpha_at`). ``v`` goes through ``W`` into the LLM in
place of the ``<image>`` tokens (:func:`mllmfl_dist.mllm.llava.llava_forward_with_visual_features`),
exactly where and how ``LlavaModel.forward`` puts its own image features (``masked_scatter`` over the
image-token positions), so with ``alpha = 0`` the loss and logits are the model's own (tested).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mllmfl_dist.fl.models import FLModel
from mllmfl_dist.mllm.llava import IGNORE_INDEX

__all__ = ["alpha_at", "TokenAdapter", "DWPStudent", "mix_visual_tokens", "caption_token_count"]


def alpha_at(
    step: int, steps: int, alpha_start: float = 0.0, schedule: str = "linear", ramp_fraction: float = 0.5
) -> float:
    """The FL features' weight for training step ``step`` (0-based) of ``steps``.

    Rises from ``alpha_start`` at step 0 to 1 at step ``ramp_fraction * steps`` (``linear``: a straight line;
    ``cosine``: half a cosine, flat at both ends), then stays 1, so the LLM reads the FL features alone for
    the rest of training.
    """
    if not 0.0 <= alpha_start <= 1.0:
        raise ValueError(f"alpha_start must be in [0, 1], got {alpha_start}")
    if schedule not in ("linear", "cosine"):
        raise ValueError(f"alpha schedule must be linear or cosine, got {schedule!r}")
    ramp = ramp_fraction * steps
    if ramp <= 0 or step >= ramp:
        return 1.0
    progress = max(step, 0) / ramp
    if schedule == "cosine":
        progress = (1.0 - math.cos(math.pi * progress)) / 2.0
    return alpha_start + (1.0 - alpha_start) * progress


class TokenAdapter(nn.Module):
    """``A``: the FL backbone's feature map ``[B, C, h, w]`` -> LLaVA's visual tokens ``[B, tokens, width]``.

    The map is average-pooled to the vision tower's patch grid (``grid_h x grid_w``, adaptive, so any FL input
    size works), each grid cell goes through a two-layer MLP (a 1x1 convolution, GELU, 1x1 convolution) to
    the vision width, and a learned position embedding is added; the cells are read in row-major order, the
    order of the tower's patch tokens. When the select strategy keeps the CLS token (``tokens ==
    grid_h * grid_w + 1``) a CLS-like token comes first: a learned vector plus the MLP of the globally pooled
    map.
    """

    def __init__(self, in_channels: int, tokens: int, grid_h: int, grid_w: int, width: int):
        super().__init__()
        cells = grid_h * grid_w
        if tokens not in (cells, cells + 1):
            raise ValueError(
                f"{tokens} visual tokens do not fit a {grid_h}x{grid_w} grid (expected {cells} "
                f"or {cells + 1} with a CLS token)"
            )
        self.tokens, self.grid = tokens, (grid_h, grid_w)
        self.has_cls = tokens == cells + 1
        self.proj = nn.Sequential(nn.Linear(in_channels, width), nn.GELU(), nn.Linear(width, width))
        self.pos = nn.Parameter(torch.zeros(1, cells, width))
        self.cls = nn.Parameter(torch.zeros(1, 1, width)) if self.has_cls else None

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(feature_map, self.grid)  # [B, C, gh, gw]
        cells = pooled.flatten(2).transpose(1, 2)  # [B, gh*gw, C], row-major like the patch tokens
        out = self.proj(cells) + self.pos
        if self.cls is not None:
            glob = self.proj(feature_map.mean(dim=(2, 3))).unsqueeze(1)  # [B, 1, width]
            out = torch.cat([self.cls + glob, out], dim=1)
        return out


class DWPStudent(nn.Module):
    """The trainable module of DWP (what DeepSpeed wraps): ``A(g_fl(x))``; the frozen LLaVA stays outside."""

    def __init__(self, backbone: FLModel, adapter: TokenAdapter):
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.backbone.feature_map(x))


def mix_visual_tokens(fl_tokens: torch.Tensor | None, clip_tokens: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """``alpha * fl + (1 - alpha) * clip``. Either side may be None where its weight is 0 (``alpha`` 0 or 1);
    during training pass both so the graph reaches the FL parameters even at ``alpha = 0``."""
    if fl_tokens is None and clip_tokens is None:
        raise ValueError("need FL tokens, CLIP tokens or both")
    if clip_tokens is None:
        if alpha != 1.0:
            raise ValueError(f"alpha = {alpha} needs the CLIP tokens")
        return fl_tokens
    if fl_tokens is None:
        if alpha != 0.0:
            raise ValueError(f"alpha = {alpha} needs the FL tokens")
        return clip_tokens
    if fl_tokens.shape != clip_tokens.shape:
        raise ValueError(f"FL tokens {tuple(fl_tokens.shape)} and CLIP tokens {tuple(clip_tokens.shape)} differ")
    return alpha * fl_tokens.to(clip_tokens.dtype) + (1.0 - alpha) * clip_tokens


def caption_token_count(labels: torch.Tensor) -> int:
    """How many tokens the shifted next-token loss averages over (labels[:, 1:] that are not -100)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
