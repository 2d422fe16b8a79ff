"""What DWP reads: the captioned samples of the annotated shards, the held-out split and the order of the
training stream (a function of seed, step and the number of data-parallel ranks), and where the stage writes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from mllmfl_dist.config import Config
from mllmfl_dist.core.seeds import TAG_PRETRAIN_ORDER, derive_seed
from mllmfl_dist.data import DataError
from mllmfl_dist.data.images import ImageBounds, UnusableImageError, decode_image
from mllmfl_dist.data.shards import SHARD_SUFFIXES, ShardError, expand_shards, iter_samples

log = logging.getLogger(__name__)


STAGE = "pretrain"
DEEPSPEED_DIR = "deepspeed"
BACKBONE_NAME = "backbone.pt"
ADAPTER_NAME = "adapter.pt"
METRICS_NAME = "metrics.json"
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def stage_dir(cfg: Config) -> Path:
    return cfg.run_dir / STAGE


def shards_pattern(cfg: Config) -> str:
    """``pretrain.shards``, or this run's annotated shards when it is empty (the ``annotate/`` directory: the
    shards in it, not its ``*.done.json`` records or ``manifest.json``)."""
    return cfg.pretrain.shards or str(cfg.run_dir / "annotate")


def model_name(cfg: Config) -> str:
    return cfg.pretrain.model or cfg.annotate.model


@dataclass(frozen=True)
class CaptionedSample:
    shard: str
    key: str
    image_bytes: bytes
    caption: str


def load_captioned(
    pattern: str,
    bounds: ImageBounds | None = None,
) -> tuple[list[CaptionedSample], list[dict[str, str]]]:
    """Captioned samples of the shards of ``pattern`` in sorted (shard, key) order, and the skipped ones
    (``{shard, key, reason}``: no caption, unreadable sample or image, an image over ``bounds``
    (``pretrain.max_image_*``), a member outside any sample, damaged shard).

    Images are decoded once here so a corrupt one is skipped now rather than failing a training step; the
    encoded bytes are kept in memory (decoded again per batch).
    """
    try:
        shards = [p for p in expand_shards(pattern) if p.name.endswith(SHARD_SUFFIXES)]
    except DataError as err:
        raise DataError(f"pretrain: {err}; run the annotate stage first or set pretrain.shards") from None
    if not shards:
        raise DataError(
            f"pretrain: no shard file (.tar, .tar.gz) matches {pattern!r}; run the annotate stage "
            "first or set pretrain.shards"
        )
    samples: list[CaptionedSample] = []
    skipped: list[dict[str, str]] = []
    for shard in shards:
        found: list[CaptionedSample] = []
        try:
            for sample in iter_samples(shard):
                reason = sample.get("error") or (None if (sample.get("txt") or "").strip() else "no caption")
                if reason is None:
                    try:
                        decode_image(sample["image_bytes"], bounds)
                    except UnusableImageError as err:
                        reason = str(err)
                if reason:
                    skipped.append({"shard": shard.name, "key": sample["key"], "reason": reason})
                    continue
                found.append(CaptionedSample(shard.name, sample["key"], sample["image_bytes"], sample["txt"].strip()))
        except ShardError as err:
            log.warning("pretrain: %s; its readable samples are used", err)
            skipped.append({"shard": shard.name, "key": "", "reason": str(err)})
        samples.extend(sorted(found, key=lambda s: s.key))
    if not samples:
        raise DataError(
            f"pretrain: no captioned samples in {len(shards)} shard(s) of {pattern!r} "
            f"({len(skipped)} without a caption or unreadable); point pretrain.shards at annotated "
            "shards (samples with .txt)"
        )
    return samples, skipped


def split_heldout(samples: Sequence[CaptionedSample], heldout: int) -> tuple[list, list]:
    """The first ``heldout`` samples (held out) and the rest (training)."""
    if heldout >= len(samples):
        raise DataError(
            f"pretrain.heldout = {heldout} leaves no training sample out of {len(samples)} "
            f"captioned samples; lower pretrain.heldout or add shards"
        )
    return list(samples[:heldout]), list(samples[heldout:])


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(derive_seed(seed, TAG_PRETRAIN_ORDER, epoch)).permutation(n)


def micro_batch_indices(
    n: int,
    seed: int,
    step: int,
    micro_step: int,
    *,
    micro_batch_size: int,
    grad_accum: int,
    dp_rank: int,
    dp_world: int,
) -> list[int]:
    """Training-sample indices of data-parallel rank ``dp_rank``'s micro-batch ``micro_step`` of step ``step``.

    The training set is read as one stream, shuffled per epoch by ``(seed, epoch)``; step ``t`` covers the
    stream's positions ``[t * G, (t + 1) * G)`` with ``G = micro_batch_size * grad_accum * dp_world``, micro
    step ``j`` of rank ``r`` the slice starting at ``t * G + (j * dp_world + r) * micro_batch_size``. So ranks
    never share a micro-batch within a step, and the order depends on (seed, step, dp_world) only.
    """
    start = (step * grad_accum * dp_world + micro_step * dp_world + dp_rank) * micro_batch_size
    out = []
    for position in range(start, start + micro_batch_size):
        epoch, offset = divmod(position, n)
        out.append(int(_epoch_order(n, seed, epoch)[offset]))
    return out
