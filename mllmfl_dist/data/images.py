"""Images between bytes, PIL and uint8 tensors, and the one rule that brings an image to a model's input size.

Decoding (:func:`decode_image`) is the one door every data path goes through (annotation, DWP, alignment,
labelled and test shards, ImageNet-LT). Before any pixel is decoded it reads the header's size and refuses
(:class:`ImageBoundsError`) an image over :class:`ImageBounds`: too many decoded pixels, or so thin that the
resize to a model's square input (short side up to the target, then a centre crop) would build an image of
``target^2 * aspect ratio`` pixels (a 20000 x 1 PNG of a few kB asks LLaVA-1.5's processor for 6.8 GB). Given
the side the model needs, a JPEG is decoded at a reduced DCT scale (``Image.draft``) and any image at least
twice that side is box-reduced (``Image.reduce``), so a decoded image held for a batch has fewer than
``(2 * side)^2 * max_aspect_ratio`` pixels. EXIF orientation is applied; 16-bit greyscale is scaled to 8 bits.

The rule (:func:`fit_square`): convert to the model's mode (``L`` for one channel, ``RGB`` for three), scale so
the shorter side is the target size (bilinear), then cut the centred square: the aspect ratio is kept and
nothing is stretched. DWP's FL input, the alignment set's images and the ImageNet-LT cache all go through it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllmfl_dist.core.errors import DataError

EXIF_ORIENTATION = 0x0112
SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N")


class UnusableImageError(DataError):
    """An image that is not used: undecodable, over the configured bounds, or of a bit depth that cannot be
    brought to 8 bits. Streaming paths skip and count it; labelled data refuses it."""


class CorruptImageError(UnusableImageError):
    """Image bytes that PIL cannot decode."""


class ImageBoundsError(UnusableImageError):
    """An image whose decoding or resizing would cost more than :class:`ImageBounds` allows."""


@dataclass(frozen=True)
class ImageBounds:
    """What decoding one image may cost: ``max_pixels`` decoded pixels (width x height, after JPEG draft
    scaling) and ``max_aspect_ratio`` (long side / short side: bounds the ``target^2 * ratio`` pixels of the
    resize before a centre crop). ``section`` names the config section the messages point at."""

    max_pixels: int
    max_aspect_ratio: float
    section: str = "data"

    @classmethod
    def of(cls, section_cfg: Any, section: str) -> ImageBounds:
        """The bounds of a config section holding ``max_image_pixels`` and ``max_image_aspect_ratio``."""
        return cls(section_cfg.max_image_pixels, section_cfg.max_image_aspect_ratio, section)

    def check(self, width: int, height: int) -> None:
        """:class:`ImageBoundsError` naming the size and the config key when ``width x height`` is over a bound."""
        if width * height > self.max_pixels:
            raise ImageBoundsError(
                f"image of {width}x{height} = {width * height} pixels is over "
                f"{self.section}.max_image_pixels = {self.max_pixels}; not decoded"
            )
        ratio = max(width, height) / max(min(width, height), 1)
        if ratio > self.max_aspect_ratio:
            raise ImageBoundsError(
                f"image of {width}x{height} has aspect ratio {ratio:.4g}, over "
                f"{self.section}.max_image_aspect_ratio = {self.max_aspect_ratio:g} (resizing "
                "its short side to a model's input would cost too much); not decoded"
            )


def decode_image(data: bytes | str | Path, bounds: ImageBounds | None = None, *, side: int | None = None):
    """A decoded PIL image of encoded bytes (or a file path), upright (EXIF orientation applied) and 8-bit.

    bounds: checked on the header's size before decoding (:class:`ImageBoundsError`); None: PIL's own
        decompression-bomb limit only.
    side: the input side (pixels) of the model the image is for: a JPEG is decoded at the smallest DCT scale
        that keeps both sides >= ``side``, and an image whose short side is >= 2 * ``side`` is reduced by the
        integer factor that keeps it >= ``side`` (box average). None: full size.
    16-bit greyscale (``I;16*``, and ``I`` with values in 0..65535) is scaled to ``L`` by /257 (rounded), ``F``
    in [0, 1] by *255; other ``I``/``F`` values raise :class:`UnusableImageError` (their depth is unknown).
    Undecodable bytes raise :class:`CorruptImageError`.
    """
    from PIL import Image, ImageOps

    try:
        image = Image.open(data if isinstance(data, (str, Path)) else io.BytesIO(data))  # the header only
        if side is not None and image.format == "JPEG":
            image.draft(None, (side, side))
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise CorruptImageError(f"cannot decode image ({type(err).__name__}: {err})") from None
    if bounds is not None:
        try:
            bounds.check(*image.size)
        except ImageBoundsError:
            image.close()
            raise
    try:
        image.load()
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception as err:  # noqa: BLE001
        raise CorruptImageError(f"cannot decode image ({type(err).__name__}: {err})") from None
    if orientation != 1:  # only then: an upright image is returned as decoded (its format kept)
        image = ImageOps.exif_transpose(image)
    image = to_8bit(image)
    if side is not None and min(image.size) >= 2 * side:
        if image.mode in ("1", "P", "PA"):  # Image.reduce takes no palette or bilevel images
            image = image.convert("L" if image.mode == "1" else "RGBA")
        image = image.reduce(min(image.size) // side)
    return image


def to_8bit(image):
    """``image`` with 16-bit or float greyscale scaled to mode ``L`` (see :func:`decode_image`); Pillow's own
    conversion clamps at 255 and turns a 16-bit image nearly white. Other modes are returned as they are."""
    from PIL import Image

    if image.mode not in SIXTEEN_BIT_GREY + ("I", "F"):
        return image
    array = np.asarray(image)
    if image.mode == "F":
        if not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
            raise UnusableImageError(
                f"float image (mode F) with values in [{array.min():g}, {array.max():g}], "
                "not [0, 1]: its scale to 8 bits is unknown"
            )
        return Image.fromarray(np.rint(array * 255.0).astype(np.uint8), mode="L")
    if array.size and (array.min() < 0 or array.max() > 65535):
        raise UnusableImageError(
            f"32-bit integer image (mode I) with values in [{array.min()}, {array.max()}], "
            "not 0..65535: its scale to 8 bits is unknown"
        )
    return Image.fromarray(((array.astype(np.uint32) + 128) // 257).astype(np.uint8), mode="L")


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
