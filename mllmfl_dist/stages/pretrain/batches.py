"""Captioned samples -> DWP batches: the FL model's input (one resize rule, the FL data's normalisation), the
processor's pixel values and the prompt + caption tokens with labels on the caption and EOS only."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mllmfl_dist.config import ConfigError
from mllmfl_dist.data import normalize
from mllmfl_dist.data.images import decode_image, model_input
from mllmfl_dist.mllm.llava import IGNORE_INDEX
from mllmfl_dist.stages.pretrain.captions import (
    CaptionedSample,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FLInput:
    """How an image becomes the FL model's input."""

    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        arrays = [model_input(image, self.size, self.channels) for image in images]
        return normalize(torch.from_numpy(np.stack(arrays)), self.mean, self.std)


@dataclass
class DWPBatch:
    x_fl: torch.Tensor  # [B, C_fl, S, S] float32, normalised
    pixel_values: torch.Tensor  # the processor's
    input_ids: torch.Tensor  # [B, L], right-padded
    attention_mask: torch.Tensor
    labels: torch.Tensor  # caption tokens and EOS; -100 elsewhere

    @property
    def size(self) -> int:
        return self.x_fl.shape[0]


class BatchBuilder:
    """Captioned samples -> :class:`DWPBatch` (decoding, FL input, processor, caption labels). ``side``: the
    largest input side the batch feeds (vision tower, FL model); images are decoded no larger than twice it
    (:func:`mllmfl_dist.data.images.decode_image`), None: full size."""

    def __init__(self, processor, prompt: str, max_caption_tokens: int, fl_input: FLInput, side: int | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.prompt = prompt
        self.max_caption_tokens = max_caption_tokens
        self.fl_input = fl_input
        self.side = side
        image_token = getattr(processor, "image_token", "<image>")
        if prompt.count(image_token) != 1:
            raise ConfigError(
                f"pretrain.prompt must contain the image placeholder {image_token!r} exactly once, got {prompt!r}"
            )
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos
        if self.eos is None:
            raise ConfigError("the LLaVA tokenizer has no EOS token; DWP appends EOS after each caption")
        self._prompt_ids: list[int] | None = None

    def check_captions(self, captions: Sequence[str]) -> None:
        """Raise the ConfigError of :meth:`from_images` now for any caption that would trigger it."""
        text_prompt = self.prompt  # the image placeholder tokenises alike with or without its expansion
        prompt = self.tokenizer(text_prompt)["input_ids"]
        for caption in captions:
            ids = self.tokenizer(f"{text_prompt} {caption}")["input_ids"]
            if _common_prefix(ids, prompt) < len(prompt) - 1:
                raise ConfigError(
                    f"pretrain.prompt: tokenising prompt + caption changes the prompt's tokens "
                    f"(caption {caption[:40]!r}); end the prompt with a separator such as ':'"
                )

    def __call__(self, samples: Sequence[CaptionedSample]) -> DWPBatch:
        images = [decode_image(s.image_bytes, side=self.side) for s in samples]
        return self.from_images(images, [s.caption for s in samples])

    def from_images(self, images: Sequence[Any], captions: Sequence[str]) -> DWPBatch:
        rgb = [image.convert("RGB") for image in images]
        if self._prompt_ids is None:
            ids = self.processor(images=rgb[:1], text=[self.prompt], return_tensors="pt")["input_ids"][0]
            self._prompt_ids = ids.tolist()
        enc = self.processor(
            images=rgb, text=[f"{self.prompt} {c}" for c in captions], return_tensors="pt", padding=True
        )
        rows, label_rows = [], []
        prompt = self._prompt_ids
        for ids, mask in zip(enc["input_ids"], enc["attention_mask"]):
            ids = ids[mask.bool()].tolist()
            if ids and ids[-1] == self.eos:
                ids = ids[:-1]  # a tokenizer that appends EOS itself
            n = _common_prefix(ids, prompt)
            if n < len(prompt) - 1:  # the last prompt token may merge with the caption's first
                raise ConfigError(
                    "pretrain.prompt: tokenising prompt + caption changes the prompt's tokens; "
                    "end the prompt with a separator such as ':'"
                )
            caption = ids[n:][: self.max_caption_tokens] + [self.eos]
            rows.append(ids[:n] + caption)
            label_rows.append([IGNORE_INDEX] * n + caption)
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for i, (row, lab) in enumerate(zip(rows, label_rows)):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention[i, : len(row)] = 1
            labels[i, : len(lab)] = torch.tensor(lab)
        return DWPBatch(self.fl_input(images), enc["pixel_values"], input_ids, attention, labels)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
