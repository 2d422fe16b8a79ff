"""Stage 1b: Dynamic Weighted Pretraining (DWP) of the FL backbone against the frozen LLaVA, under DeepSpeed.

What is trained: the FL backbone ``g_fl`` (built exactly as stage 2 builds it, ``build_fl_model``) plus the
token adapter ``A`` (:mod:`mllmfl_dist.stages.pretrain.dwp`), wrapped together in one DeepSpeed engine. LLaVA (vision
tower ``g``, projector ``W``, LLM) is loaded with :func:`mllmfl_dist.mllm.llava.load_llava`, frozen, and kept
outside the engine. A training micro-batch is a set of captioned images:

- ``x_fl``: the image at the FL model's size and channel count (grayscale ``L`` for one channel, RGB for
  three; resized with a centre crop when the size differs), normalised with the FL data's own per-channel
  mean/std (``ClientData.mean/std``, what stage 2 normalises with), so the backbone sees the same input
  distribution in both stages;
- ``x_clip``: the processor's ``pixel_values``;
- the text ``prompt + " " + caption`` tokenised by the processor (so the ``<image>`` expansion is the
  model's own), the caption cut to ``max_caption_tokens``, EOS appended, right-padded; labels are the
  caption tokens and EOS, -100 everywhere else.

The loss is LLaVA's next-token cross-entropy on the caption with the visual tokens
``v = alpha(t) * A(g_fl(x_fl)) + (1 - alpha(t)) * g(x_clip)``; ``engine(x_fl)`` computes ``A(g_fl(x_fl))``,
``engine.backward(loss)`` and ``engine.step()`` do the rest (gradient all-reduce over the data-parallel
ranks, clipping, optimizer, LR schedule).

Data: captioned samples of ``pretrain.shards`` (default: this run's ``annotate/`` output) in sorted
shard/key order; samples without a caption, with an unreadable image or one over ``pretrain.max_image_pixels`` /
``pretrain.max_image_aspect_ratio`` are skipped and counted. The first
``pretrain.heldout`` are held out; the rest form a stream shuffled per epoch by ``(seed, epoch)``, and step
``t`` reads the stream's positions ``[t * G, (t + 1) * G)`` (``G`` = micro batch x accumulation x
data-parallel ranks), each rank its own contiguous slices, so ranks see disjoint micro-batches and the data
order is a function of (seed, step, number of data-parallel ranks): the DeepSpeed checkpoint, which records
that number, is all a resume needs, and a resume on another number of ranks is refused.

Ranks: ``pretrain.ranks = "all"`` makes every rank a DeepSpeed data-parallel rank on the default process
group (each loads LLaVA). ``"rank0"`` is accepted with one process only: DeepSpeed's checkpointing
(``engine.save_checkpoint``) barriers on the whole process group, so rank 0 cannot train alone while the
other ranks of a multi-process job wait elsewhere; that case is refused with a ``ConfigError``. The logged
``loss`` is rank 0's mean over its micro-batches of the step; held-out losses are computed on every rank
(ZeRO-3 needs all ranks in a forward) and rank 0's are recorded.

Precision: LLaVA is loaded in the dtype of ``pretrain.deepspeed.precision`` (fp32 / bf16 / fp16; fp16 is
refused where DeepSpeed does not support it, e.g. on the CPU). The backbone trains in the contiguous memory
format whatever ``model.channels_last`` says (DeepSpeed broadcasts parameters as byte views, which
channels_last weights cannot give); the saved values are the same.

Outputs under ``<run dir>/pretrain/`` (rank 0): ``backbone.pt`` (``FLModel.backbone_state_dict()``),
``adapter.pt``, ``metrics.json``; DeepSpeed checkpoints in ``deepspeed/`` (every ``checkpoint_every`` steps and
at the end; the loss history rides along as client state). A rerun resumes from the latest checkpoint; a
finished run (``backbone.pt`` and ``metrics.json`` present) is skipped.
"""

from mllmfl_dist.stages.deepspeed_setup import deepspeed_config
from mllmfl_dist.stages.pretrain.batches import BatchBuilder, DWPBatch, FLInput
from mllmfl_dist.stages.pretrain.captions import (
    CaptionedSample,
    load_captioned,
    micro_batch_indices,
    shards_pattern,
    split_heldout,
    stage_dir,
)
from mllmfl_dist.stages.pretrain.recipe import run_pretrain

__all__ = [
    "BatchBuilder",
    "CaptionedSample",
    "DWPBatch",
    "FLInput",
    "deepspeed_config",
    "load_captioned",
    "micro_batch_indices",
    "run_pretrain",
    "shards_pattern",
    "split_heldout",
    "stage_dir",
]
