"""Settings of the knowledge-bearing MLLM stand-ins' training (`tiny-models DIR --train CORPUS`).

One frozen dataclass, recorded in the build's manifest and model card; a directory built with other settings
(or another corpus) is rebuilt rather than reused. The defaults are the shipped build's; `StandinSettings.quick`
is a short training on a slice of the corpus for the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["StandinSettings"]


@dataclass(frozen=True)
class StandinSettings:
    """How the stand-ins are trained. Epochs are passes over the (possibly limited) corpus."""

    seed: int = 0
    limit: int | None = None  # use only the first `limit` captioned samples of the corpus (None: all)
    threads: int = 2  # torch intra-op threads while training (results depend on it on the CPU)
    # CLIP: open_clip's model and ClipLoss (geometry: tiny.CLIP_CONFIG)
    clip_epochs: int = 12
    clip_batch_size: int = 128
    clip_lr: float = 1e-3
    clip_weight_decay: float = 0.1
    # LLaVA: the CLIP's image tower (frozen), a projector and a small Llama
    vision_feature_layer: int = -2
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 256
    lm_epochs: int = 6  # stage 0: the language model alone on caption text (stands in for a pretrained LLM)
    projector_epochs: int = 2  # stage 1: projector only, LM frozen, describe -> caption
    finetune_epochs: int = 6  # stage 2: projector + LM on describe -> caption and question -> category
    llava_batch_size: int = 64
    lm_lr: float = 3e-3
    projector_lr: float = 2e-3
    finetune_lr: float = 2e-3
    # model card: images per class of the balanced test shards measured (None: all of them)
    card_per_class: int | None = None

    @classmethod
    def quick(cls, **overrides) -> StandinSettings:
        """A short training for tests (about 40 s on 2 cores): the first 1,500 corpus samples, fewer CLIP
        steps, more passes of the (cheap) LLaVA stages at higher learning rates, 20 test images per class."""
        base = cls(
            limit=1500,
            clip_epochs=8,
            clip_batch_size=64,
            lm_epochs=8,
            lm_lr=3e-3,
            projector_epochs=2,
            finetune_epochs=12,
            finetune_lr=2e-3,
            card_per_class=20,
        )
        return replace(base, **overrides)
