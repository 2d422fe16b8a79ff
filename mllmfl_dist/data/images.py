"""Images between bytes, PIL and uint8 tensors, and the one rule that brings an image to a model's input size.

The rule (:func:`fit_square`): convert to the model's mode (``L`` for one channel, ``RGB`` for three), scale so
the shorter side is the target size (bilinear), then cut the centred square: the aspect ratio is kept and
nothing is stretched. DWP's FL input, the alignment set's images and the ImageNet-LT cache all go through it.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from mllmfl_dist.core.errors import DataError


class CorruptImageError(DataError):
    """Image bytes that PIL cannot decode."""


def decode_image(data: bytes):
    """A fully decoded PIL image; :class:`CorruptImageError` when PIL cannot decode ``data``."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise CorruptImageError(f"cannot decode image ({type(err).__name__}: {err})") from None
    return image


def to_pil(image: Any):
    """A PIL image from a uint8 array/tensor ``[H, W]``, ``[1, H, W]`` (mode ``L``) or ``[3, H, W]``
    (``RGB``); a PIL image is returned as it is."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[0] == 3:
        return Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), mode="RGB")
    if array.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(array), mode="L")
    raise ValueError(f"image arrays must be [H, W], [1, H, W] or [3, H, W], got {array.shape}")


def encode_png(image: Any) -> bytes:
    """PNG bytes of a PIL image, or of a uint8 array/tensor ``[H, W]``, ``[1, H, W]`` or ``[3, H, W]``
    (grayscale is written as mode ``L``, three channels as ``RGB``)."""
    image = to_pil(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def image_to_array(image) -> np.ndarray:
    """uint8 ``[C, H, W]``: grayscale modes give C = 1, everything else RGB (alpha dropped), C = 3."""
    if image.mode != "L":
        image = image.convert("L" if image.mode in ("1", "LA", "La", "I", "I;16", "F") else "RGB")
    array = np.array(image, dtype=np.uint8)  # a writable copy (np.asarray of a PIL image is read-only)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def fit_square(image, size: int):
    """``image`` (PIL) scaled so its shorter side is ``size`` and cut to the centred ``size x size`` square;
    an image of that size already is returned unchanged."""
    from PIL import Image

    w, h = image.size
    if (w, h) == (size, size):
        return image
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.BILINEAR)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def model_input(image, size: int, channels: int) -> np.ndarray:
    """uint8 ``[channels, size, size]`` of a PIL image for a model with 1 (``L``) or 3 (``RGB``) input channels,
    by :func:`fit_square`."""
    array = np.array(fit_square(image.convert("L" if channels == 1 else "RGB"), size), dtype=np.uint8)
    return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))
