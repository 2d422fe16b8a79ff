"""How an MLLM captions images: the decoding settings recorded with every caption (:class:`Generation`) and
one batched ``generate`` call (:func:`caption_batch`); the annotation stage and the stand-ins' model card
both caption through here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mllmfl_dist.config import AnnotateConfig


@dataclass(frozen=True)
class Generation:
    """Decoding settings, recorded with every caption."""

    prompt: str
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    num_beams: int

    @classmethod
    def from_config(cls, cfg: AnnotateConfig) -> Generation:
        return cls(cfg.prompt, cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p, cfg.num_beams)

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs


@torch.no_grad()
def caption_batch(model, processor, images: Sequence[Any], generation: Generation) -> list[str]:
    """Captions of ``images`` (PIL) in one batched ``generate`` call: one vision-tower pass over the batch
    and one left-padded decoder batch."""
    inputs = processor(images=list(images), text=[generation.prompt] * len(images), return_tensors="pt", padding=True)
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    output = model.generate(**inputs, **generation.generate_kwargs(), pad_token_id=processor.tokenizer.pad_token_id)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]
