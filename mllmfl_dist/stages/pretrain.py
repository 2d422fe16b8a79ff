"""Stage 1b: Dynamic Weighted Pretraining (DWP) of the FL backbone against the frozen LLaVA, under DeepSpeed.

What is trained: the FL backbone ``g_fl`` (built exactly as stage 2 builds it, ``build_fl_model``) plus the
token adapter ``A`` (:mod:`mllmfl_dist.models.dwp`), wrapped together in one DeepSpeed engine. LLaVA (vision
tower ``g``, projector ``W``, LLM) is loaded with :func:`mllmfl_dist.models.mllm.load_llava`, frozen, and kept
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
shard/key order; samples without a caption or with an unreadable image are skipped and counted. The first
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

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllmfl_dist.core import checkpoint, dist
from mllmfl_dist.config import Config, ConfigError
from mllmfl_dist.data import DataError, normalize
from mllmfl_dist.data.images import CorruptImageError, decode_image
from mllmfl_dist.data.shards import (SHARD_SUFFIXES, ShardError, expand_shards,
                                     iter_samples)
from mllmfl_dist.core.errors import TrainingDivergedError
from mllmfl_dist.core.seeds import TAG_ADAPTER_INIT, TAG_PRETRAIN_ORDER, derive_seed
from mllmfl_dist.data.images import model_input
from mllmfl_dist.fl.strategies import build_strategy
from mllmfl_dist.stages.inputs import build_data, build_fl_model
from mllmfl_dist.stages.deepspeed_setup import check_precision, deepspeed_config, prepare_deepspeed
from mllmfl_dist.stages.pretrain_report import PretrainReport
from mllmfl_dist.models.dwp import (IGNORE_INDEX, DWPStudent, TokenAdapter, alpha_at, caption_token_count,
                                    llava_forward_with_visual_features, mix_visual_tokens)
from mllmfl_dist.stages.pretrain_checkpoint import (check_resume, find_resume_point, install_safe_engine,
                                                    save_checkpoint, tag_dirs)

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


# ---------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class CaptionedSample:
    shard: str
    key: str
    image_bytes: bytes
    caption: str


def load_captioned(pattern: str) -> tuple[list[CaptionedSample], list[dict[str, str]]]:
    """Captioned samples of the shards of ``pattern`` in sorted (shard, key) order, and the skipped ones
    (``{shard, key, reason}``: no caption, unreadable sample or image, damaged shard).

    Images are decoded once here so a corrupt one is skipped now rather than failing a training step; the
    encoded bytes are kept in memory (decoded again per batch).
    """
    try:
        shards = [p for p in expand_shards(pattern) if p.name.endswith(SHARD_SUFFIXES)]
    except DataError as err:
        raise DataError(f"pretrain: {err}; run the annotate stage first or set pretrain.shards") from None
    if not shards:
        raise DataError(f"pretrain: no shard file (.tar, .tar.gz) matches {pattern!r}; run the annotate stage "
                        "first or set pretrain.shards")
    samples: list[CaptionedSample] = []
    skipped: list[dict[str, str]] = []
    for shard in shards:
        found: list[CaptionedSample] = []
        try:
            for sample in iter_samples(shard):
                reason = sample.get("error") or (None if (sample.get("txt") or "").strip() else "no caption")
                if reason is None:
                    try:
                        decode_image(sample["image_bytes"])
                    except CorruptImageError as err:
                        reason = str(err)
                if reason:
                    skipped.append({"shard": shard.name, "key": sample["key"], "reason": reason})
                    continue
                found.append(CaptionedSample(shard.name, sample["key"], sample["image_bytes"],
                                             sample["txt"].strip()))
        except ShardError as err:
            log.warning("pretrain: %s; its readable samples are used", err)
            skipped.append({"shard": shard.name, "key": "", "reason": str(err)})
        samples.extend(sorted(found, key=lambda s: s.key))
    if not samples:
        raise DataError(f"pretrain: no captioned samples in {len(shards)} shard(s) of {pattern!r} "
                        f"({len(skipped)} without a caption or unreadable); point pretrain.shards at annotated "
                        "shards (samples with .txt)")
    return samples, skipped


def split_heldout(samples: Sequence[CaptionedSample], heldout: int) -> tuple[list, list]:
    """The first ``heldout`` samples (held out) and the rest (training)."""
    if heldout >= len(samples):
        raise DataError(f"pretrain.heldout = {heldout} leaves no training sample out of {len(samples)} "
                        f"captioned samples; lower pretrain.heldout or add shards")
    return list(samples[:heldout]), list(samples[heldout:])


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(derive_seed(seed, TAG_PRETRAIN_ORDER, epoch)).permutation(n)


def micro_batch_indices(n: int, seed: int, step: int, micro_step: int, *, micro_batch_size: int,
                        grad_accum: int, dp_rank: int, dp_world: int) -> list[int]:
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
    """Captioned samples -> :class:`DWPBatch` (decoding, FL input, processor, caption labels)."""

    def __init__(self, processor, prompt: str, max_caption_tokens: int, fl_input: FLInput):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.prompt = prompt
        self.max_caption_tokens = max_caption_tokens
        self.fl_input = fl_input
        image_token = getattr(processor, "image_token", "<image>")
        if prompt.count(image_token) != 1:
            raise ConfigError(f"pretrain.prompt must contain the image placeholder {image_token!r} exactly once, "
                              f"got {prompt!r}")
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
                raise ConfigError(f"pretrain.prompt: tokenising prompt + caption changes the prompt's tokens "
                                  f"(caption {caption[:40]!r}); end the prompt with a separator such as ':'")

    def __call__(self, samples: Sequence[CaptionedSample]) -> DWPBatch:
        images = [decode_image(s.image_bytes) for s in samples]
        return self.from_images(images, [s.caption for s in samples])

    def from_images(self, images: Sequence[Any], captions: Sequence[str]) -> DWPBatch:
        rgb = [image.convert("RGB") for image in images]
        if self._prompt_ids is None:
            ids = self.processor(images=rgb[:1], text=[self.prompt], return_tensors="pt")["input_ids"][0]
            self._prompt_ids = ids.tolist()
        enc = self.processor(images=rgb, text=[f"{self.prompt} {c}" for c in captions], return_tensors="pt",
                             padding=True)
        rows, label_rows = [], []
        prompt = self._prompt_ids
        for ids, mask in zip(enc["input_ids"], enc["attention_mask"]):
            ids = ids[mask.bool()].tolist()
            if ids and ids[-1] == self.eos:
                ids = ids[:-1]  # a tokenizer that appends EOS itself
            n = _common_prefix(ids, prompt)
            if n < len(prompt) - 1:  # the last prompt token may merge with the caption's first
                raise ConfigError("pretrain.prompt: tokenising prompt + caption changes the prompt's tokens; "
                                  "end the prompt with a separator such as ':'")
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


# ------------------------------------------------------------------------------------------ the model


def build_student(cfg: Config, llava, runtime: dist.Runtime | None = None) -> tuple[DWPStudent, FLInput]:
    """``g_fl`` (exactly stage 2's ``build_fl_model``) plus a fresh adapter onto LLaVA's visual-token grid,
    and the FL input transform (size, channels and normalisation of the FL data)."""
    from mllmfl_dist.models.mllm import vision_grid

    data = build_data(cfg, runtime)
    backbone = build_fl_model(cfg.model, data, cfg.run.seed, build_strategy(cfg).projection_dim())
    # DeepSpeed broadcasts parameters as byte views, which channels_last conv weights cannot give; the
    # memory format changes no value, so the saved backbone is the same either way.
    backbone.to(memory_format=torch.contiguous_format)
    backbone.input_memory_format = torch.contiguous_format
    if data.in_channels not in (1, 3):
        raise ConfigError(f"pretrain needs an FL model with 1 or 3 input channels to feed it the captioned "
                          f"images; the data ({cfg.data.source}) has {data.in_channels}")
    fl_input = FLInput(data.in_channels, data.image_size, tuple(data.mean), tuple(data.std))
    tokens, grid_h, grid_w, width = vision_grid(llava)
    with torch.random.fork_rng(devices=[]):  # the adapter's init from its own stream; the global RNG is left alone
        torch.manual_seed(derive_seed(cfg.run.seed, TAG_ADAPTER_INIT))
        adapter = TokenAdapter(backbone.map_channels, tokens, grid_h, grid_w, width)
    return DWPStudent(backbone, adapter), fl_input


def _visual_tokens(engine, llava, batch: DWPBatch, alpha: float, device: torch.device,
                   training: bool) -> torch.Tensor:
    from mllmfl_dist.models.mllm import clip_visual_features

    fl = None
    if training or alpha > 0.0:
        fl = engine(batch.x_fl.to(device=device, dtype=_module_dtype(engine)))
    clip = None
    if alpha < 1.0:
        with torch.no_grad():
            clip = clip_visual_features(llava, batch.pixel_values)
    if training and clip is not None:
        return mix_visual_tokens(fl, clip, alpha)  # keeps the graph to g_fl even at alpha = 0
    return mix_visual_tokens(fl if alpha > 0.0 else None, clip, alpha)


def _match_buffer_dtype(module: torch.nn.Module) -> None:
    """Under bf16/fp16 DeepSpeed casts the parameters only; BatchNorm's running statistics follow them so
    the backbone runs in eval mode (held-out losses) too."""
    dtype = next(module.parameters()).dtype
    for buffer in module.buffers():
        if buffer.is_floating_point() and buffer.dtype != dtype:
            buffer.data = buffer.data.to(dtype)


def _module_dtype(engine) -> torch.dtype:
    return next(engine.module.parameters()).dtype


def _lm_output(engine, llava, batch: DWPBatch, alpha: float, device: torch.device, training: bool):
    v = _visual_tokens(engine, llava, batch, alpha, device, training)
    return llava_forward_with_visual_features(llava, v, batch.input_ids.to(device),
                                              batch.attention_mask.to(device), batch.labels.to(device))


@torch.no_grad()
def _stop_if_non_finite(runtime: dist.Runtime, loss: torch.Tensor, step: int, cfg: Config) -> None:
    """Every rank stops, before the step that would spread it to the weights, when any rank's loss is
    NaN or inf (one number summed over the ranks); the last DeepSpeed checkpoint stays the resume point."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0])
    if float(dist.all_reduce_control_(runtime, bad, "every rank's DWP loss")[0]) > 0:
        ds = cfg.pretrain.deepspeed
        raise TrainingDivergedError(
            f"DWP step {step}: the language-model loss went non-finite; nothing of this step was saved and the "
            f"last DeepSpeed checkpoint is kept. Look at pretrain.deepspeed.lr = {ds.lr:g}, "
            f"pretrain.deepspeed.precision = {ds.precision!r}, pretrain.deepspeed.gradient_clipping = "
            f"{ds.gradient_clipping:g}")


def heldout_loss(engine, llava, builder: BatchBuilder, samples: Sequence[CaptionedSample], alpha: float,
                 batch_size: int, device: torch.device) -> float:
    """Held-out next-token loss on the captions (mean over all caption tokens) with visual tokens mixed at
    ``alpha`` (1: FL features alone; 0: CLIP features alone), the FL model in eval mode."""
    engine.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(samples), batch_size):
            batch = builder(samples[start: start + batch_size])
            out = _lm_output(engine, llava, batch, alpha, device, training=False)
            n = caption_token_count(batch.labels)
            total += float(out.loss) * n
            count += n
    finally:
        engine.train()
    return total / max(count, 1)


# --------------------------------------------------------------------------------------- the process group


# ------------------------------------------------------------------------------------------- the stage


def run_pretrain(cfg: Config, runtime: dist.Runtime, *, progress: bool = True,
                 stop_at: int | None = None) -> dict[str, Any]:
    """Run (or resume, or skip if finished) DWP; returns ``metrics.json``'s content on rank 0, ``{}`` elsewhere.

    ``stop_at``: end after this global step, with a DeepSpeed checkpoint there and no final outputs, as if
    the job had been stopped (tests; time-sliced jobs). A rerun continues from it.
    """
    pcfg = cfg.pretrain
    if pcfg.ranks == "rank0" and runtime.world_size > 1:
        raise ConfigError(
            f"pretrain.ranks = 'rank0' with {runtime.world_size} processes is not supported: DeepSpeed "
            "synchronises checkpoints over the whole process group (engine.save_checkpoint barriers on every "
            "rank), so rank 0 cannot train alone inside a multi-process job. Use pretrain.ranks = 'all' (every "
            "rank a data-parallel rank) or run the pretrain stage as one process")
    if not model_name(cfg):
        raise ConfigError("pretrain.model and annotate.model are empty; set pretrain.model to a hub id (e.g. "
                          "llava-hf/llava-1.5-7b-hf) or a directory (e.g. one made by "
                          "`python -m mllmfl_dist tiny-models DIR`)")
    out = stage_dir(cfg)
    ds_dir = out / DEEPSPEED_DIR
    finished = dist.server_decides(runtime, lambda: _finished(out), "rank 0's check of a finished DWP stage")
    if finished:
        metrics: dict[str, Any] = {}
        if runtime.is_server:
            log.info("%s is complete; nothing to train. Delete it to pretrain again.", out)
            metrics = json.loads((out / METRICS_NAME).read_text())
        dist.stage_barrier(runtime)
        return metrics
    # Rank 0 picks the checkpoint to resume from and checks its config before any model is loaded (and before
    # DeepSpeed reads a file); every rank hears the verdict, so a refusal ends them all alike.
    def resume_point() -> str | None:
        try:
            # Temporary files of saves a killed job cut short (no rank of this job writes there yet).
            checkpoint.remove_stale_temps(out, ds_dir, *tag_dirs(ds_dir).values())
            point = find_resume_point(ds_dir)
        except OSError as err:  # an unreadable directory
            raise ConfigError(f"{ds_dir}: {err}") from None
        if point is not None:
            check_resume(cfg, point.client_state, ds_dir, runtime.world_size)
        return point.tag if point else None

    resume_tag = dist.server_decides(runtime, resume_point, "rank 0's choice of the DWP checkpoint to resume",
                                     catch=(ConfigError,))

    prepare_deepspeed(runtime.device, pcfg.deepspeed.cpu_comm)  # before the import: nothing to JIT-compile
    import deepspeed

    from mllmfl_dist.models.mllm import load_llava

    check_precision(pcfg.deepspeed.precision)
    samples, skipped = load_captioned(shards_pattern(cfg))
    heldout, train = split_heldout(samples, pcfg.heldout)

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    device = runtime.device
    llava, processor = load_llava(model_name(cfg), dtype=PRECISION_DTYPES[pcfg.deepspeed.precision],
                                  device=device, device_map="")
    llava.eval().requires_grad_(False)
    student, fl_input = build_student(cfg, llava, runtime)
    builder = BatchBuilder(processor, pcfg.prompt, pcfg.max_caption_tokens, fl_input)
    # Every rank checks every caption before training, so a bad prompt ends all ranks together instead of
    # one rank mid-run while the others wait in a gradient all-reduce.
    builder.check_captions([sample.caption for sample in samples])

    dist.ensure_process_group(runtime)
    dp_world, dp_rank = runtime.world_size, runtime.rank
    # torch's Adam/AdamW through DeepSpeed on every device: nothing to compile (DeepSpeed's fused/CPU Adam is
    # a JIT-built extension: minutes on a CPU, and it needs the CUDA toolkit on a GPU node).
    ds_config = deepspeed_config(pcfg, dp_world, torch_optimizer=True)
    student.to(device)
    engine, _, _, _ = deepspeed.initialize(model=student, model_parameters=list(student.parameters()),
                                           config=ds_config)
    _match_buffer_dtype(engine.module)
    install_safe_engine(engine)  # DeepSpeed's loads weights_only, its saves atomic

    state: dict[str, Any] = {"loss": [], "heldout_loss_alpha1_step0": None, "train_seconds": 0.0,
                             "train_samples": 0}
    if resume_tag is not None:
        path, client_state = engine.load_checkpoint(str(ds_dir), tag=resume_tag)
        if path is None:
            raise ConfigError(f"cannot load the DeepSpeed checkpoint {ds_dir / resume_tag}; move it away to resume "
                              "from an older one")
        state.update({k: client_state[k] for k in state if k in client_state})
        state["loss"] = [r for r in state["loss"] if r["step"] <= engine.global_steps]
    start = engine.global_steps
    if start > pcfg.steps:
        raise ConfigError(f"{ds_dir} is at step {start}, past pretrain.steps = {pcfg.steps}; raise "
                          "pretrain.steps or delete the directory to start over")
    if start and runtime.is_server:
        log.info("resuming DWP from %s at step %d", ds_dir, start)

    accum = pcfg.deepspeed.gradient_accumulation_steps
    batch_size = pcfg.micro_batch_size
    if state["heldout_loss_alpha1_step0"] is None:
        state["heldout_loss_alpha1_step0"] = heldout_loss(engine, llava, builder, heldout, 1.0, batch_size, device)

    end = pcfg.steps if stop_at is None else min(pcfg.steps, stop_at)
    report = PretrainReport(cfg, runtime, out, start, state["heldout_loss_alpha1_step0"],
                            global_batch=batch_size * accum * dp_world, progress=progress)
    engine.train()
    for step in range(start, end):
        alpha = alpha_at(step, pcfg.steps, pcfg.alpha_start, pcfg.alpha_schedule, pcfg.ramp_fraction)
        began = time.perf_counter()
        losses = []
        for micro in range(accum):
            idx = micro_batch_indices(len(train), cfg.run.seed, step, micro, micro_batch_size=batch_size,
                                      grad_accum=accum, dp_rank=dp_rank, dp_world=dp_world)
            batch = builder([train[i] for i in idx])
            loss = _lm_output(engine, llava, batch, alpha, device, training=True).loss
            _stop_if_non_finite(runtime, loss, engine.global_steps + 1, cfg)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        state["train_seconds"] += time.perf_counter() - began
        state["train_samples"] += batch_size * accum * dp_world
        record = {"step": engine.global_steps, "loss": sum(losses) / len(losses), "alpha": alpha}
        state["loss"].append(record)
        report.step(record, time.perf_counter() - began)
        done = engine.global_steps
        if done % pcfg.checkpoint_every == 0 or done == end:
            save_checkpoint(engine, ds_dir, cfg, state, runtime)

    if engine.global_steps < pcfg.steps:  # stopped early (stop_at): the checkpoint is the output
        report.close()
        dist.stage_barrier(runtime)
        return {"stopped_at": engine.global_steps, "loss": state["loss"]} if runtime.is_server else {}

    final_alpha1 = heldout_loss(engine, llava, builder, heldout, 1.0, batch_size, device)
    final_alpha0 = heldout_loss(engine, llava, builder, heldout, 0.0, batch_size, device)
    backbone_state, adapter_state = _module_states(engine, pcfg.deepspeed.zero_stage)
    metrics = {}
    if runtime.is_server:
        seconds = state["train_seconds"]
        metrics = {
            "loss": state["loss"],
            "heldout_loss_alpha1_step0": state["heldout_loss_alpha1_step0"],
            "heldout_loss_alpha1": final_alpha1,
            "heldout_loss_alpha0": final_alpha0,
            "samples_per_second": state["train_samples"] / seconds if seconds > 0 else 0.0,
            "train_seconds": seconds,
            "train_samples": state["train_samples"],
            "steps": engine.global_steps,
            "world_size": runtime.world_size,
            "data_parallel_ranks": dp_world,
            "global_batch_size": batch_size * accum * dp_world,
            "captioned_samples": len(samples),
            "heldout_samples": len(heldout),
            "train_samples_distinct": len(train),
            "skipped_samples": len(skipped),
            "skipped": skipped[:100],
            "model": model_name(cfg),
            "shards": shards_pattern(cfg),
            "fl_input": dataclasses.asdict(fl_input),
            "deepspeed": {"engine": type(engine).__name__, "optimizer": _optimizer_name(engine),
                          "global_steps": engine.global_steps, "zero_stage": pcfg.deepspeed.zero_stage,
                          "precision": pcfg.deepspeed.precision, "config": ds_config},
        }
        checkpoint.save_atomic(backbone_state, out / BACKBONE_NAME)
        checkpoint.save_atomic(adapter_state, out / ADAPTER_NAME)
        # What marks the stage finished: the outputs' digests, so a torn or replaced file is not taken as done.
        metrics["outputs"] = {name: checkpoint.file_identity(out / name, digest=True)
                              for name in (BACKBONE_NAME, ADAPTER_NAME)}
        metrics = json.loads(json.dumps(metrics))  # what metrics.json holds (lists, not tuples)
        # last: it marks the stage as finished
        checkpoint.write_text_atomic(out / METRICS_NAME, json.dumps(metrics, indent=2))
    report.close(metrics)
    dist.stage_barrier(runtime)
    return metrics


def _finished(out: Path) -> bool:
    """Whether ``metrics.json`` marks the stage finished and the outputs it records are the files on disk; a
    torn or replaced ``backbone.pt`` is rewritten from the last DeepSpeed checkpoint instead of being used."""
    try:
        metrics = json.loads((out / METRICS_NAME).read_text())
    except (OSError, ValueError):
        return False
    outputs = metrics.get("outputs") if isinstance(metrics, dict) else None
    if outputs is None:  # written before the outputs were recorded
        return (out / BACKBONE_NAME).is_file()
    intact = isinstance(outputs, dict) and all(checkpoint.same_file(out / name, outputs.get(name))
                                               for name in (BACKBONE_NAME, ADAPTER_NAME))
    if not intact:
        log.warning("pretrain: %s or %s is not the file %s recorded (truncated or replaced since); writing them "
                    "again from the last DeepSpeed checkpoint", BACKBONE_NAME, ADAPTER_NAME, METRICS_NAME)
    return intact


def _module_states(engine, zero_stage: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The backbone's and adapter's state dicts (cloned, on the CPU); under ZeRO-3 gathered on every rank."""
    context = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed

        context = deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    with context:
        student: DWPStudent = engine.module
        backbone = {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
                    for k, v in student.backbone.backbone_state_dict().items()}
        adapter = {k: v.detach().float().cpu().clone() for k, v in student.adapter.state_dict().items()}
    return backbone, adapter


def _optimizer_name(engine) -> str:
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", None)
    name = type(optimizer).__name__
    return f"{name}({type(inner).__name__})" if inner is not None and inner is not optimizer else name
