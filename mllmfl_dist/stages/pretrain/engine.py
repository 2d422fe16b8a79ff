"""The DWP student (``g_fl`` + token adapter) and its forward through the frozen LLaVA: mixed visual tokens,
the language-model loss, the held-out losses, the non-finite stop and the trained weights read back."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch

from mllmfl_dist.config import Config, ConfigError
from mllmfl_dist.core import dist
from mllmfl_dist.core.errors import TrainingDivergedError
from mllmfl_dist.core.seeds import TAG_ADAPTER_INIT, derive_seed
from mllmfl_dist.fl.strategies import build_strategy
from mllmfl_dist.mllm.llava import clip_visual_features, llava_forward_with_visual_features, vision_grid
from mllmfl_dist.stages.pretrain.dwp import (
    DWPStudent,
    TokenAdapter,
    caption_token_count,
    mix_visual_tokens,
)
from mllmfl_dist.stages.inputs import build_data, build_fl_model
from mllmfl_dist.stages.pretrain.batches import BatchBuilder, DWPBatch, FLInput
from mllmfl_dist.stages.pretrain.captions import (
    CaptionedSample,
)

log = logging.getLogger(__name__)


def build_student(cfg: Config, llava, runtime: dist.Runtime | None = None) -> tuple[DWPStudent, FLInput]:
    """``g_fl`` (exactly stage 2's ``build_fl_model``) plus a fresh adapter onto LLaVA's visual-token grid,
    and the FL input transform (size, channels and normalisation of the FL data)."""
    data = build_data(cfg, runtime)
    backbone = build_fl_model(cfg.model, data, cfg.run.seed, build_strategy(cfg).projection_dim)
    # DeepSpeed broadcasts parameters as byte views, which channels_last conv weights cannot give; the
    # memory format changes no value, so the saved backbone is the same either way.
    backbone.to(memory_format=torch.contiguous_format)
    backbone.input_memory_format = torch.contiguous_format
    if data.in_channels not in (1, 3):
        raise ConfigError(
            f"pretrain needs an FL model with 1 or 3 input channels to feed it the captioned "
            f"images; the data ({cfg.data.source}) has {data.in_channels}"
        )
    fl_input = FLInput(data.in_channels, data.image_size, tuple(data.mean), tuple(data.std))
    tokens, grid_h, grid_w, width = vision_grid(llava)
    with torch.random.fork_rng(devices=[]):  # the adapter's init from its own stream; the global RNG is left alone
        torch.manual_seed(derive_seed(cfg.run.seed, TAG_ADAPTER_INIT))
        adapter = TokenAdapter(backbone.map_channels, tokens, grid_h, grid_w, width)
    return DWPStudent(backbone, adapter), fl_input


def _visual_tokens(engine, llava, batch: DWPBatch, alpha: float, device: torch.device, training: bool) -> torch.Tensor:
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


def match_buffer_dtype(module: torch.nn.Module) -> None:
    """Under bf16/fp16 DeepSpeed casts the parameters only; BatchNorm's running statistics follow them so
    the backbone runs in eval mode (held-out losses) too."""
    dtype = next(module.parameters()).dtype
    for buffer in module.buffers():
        if buffer.is_floating_point() and buffer.dtype != dtype:
            buffer.data = buffer.data.to(dtype)


def _module_dtype(engine) -> torch.dtype:
    return next(engine.module.parameters()).dtype


def lm_output(engine, llava, batch: DWPBatch, alpha: float, device: torch.device, training: bool):
    v = _visual_tokens(engine, llava, batch, alpha, device, training)
    return llava_forward_with_visual_features(
        llava, v, batch.input_ids.to(device), batch.attention_mask.to(device), batch.labels.to(device)
    )


@torch.no_grad()
def stop_if_non_finite(runtime: dist.Runtime, loss: torch.Tensor, step: int, cfg: Config) -> None:
    """Every rank stops, before the step that would spread it to the weights, when any rank's loss is
    NaN or inf (one number summed over the ranks); the last DeepSpeed checkpoint stays the resume point."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0])
    if float(dist.all_reduce_control_(runtime, bad, "every rank's DWP loss")[0]) > 0:
        ds = cfg.pretrain.deepspeed
        raise TrainingDivergedError(
            f"DWP step {step}: the language-model loss went non-finite; nothing of this step was saved and the "
            f"last DeepSpeed checkpoint is kept. Look at pretrain.deepspeed.lr = {ds.lr:g}, "
            f"pretrain.deepspeed.precision = {ds.precision!r}, pretrain.deepspeed.gradient_clipping = "
            f"{ds.gradient_clipping:g}"
        )


def heldout_loss(
    engine,
    llava,
    builder: BatchBuilder,
    samples: Sequence[CaptionedSample],
    alpha: float,
    batch_size: int,
    device: torch.device,
) -> float:
    """Held-out next-token loss on the captions (mean over all caption tokens) with visual tokens mixed at
    ``alpha`` (1: FL features alone; 0: CLIP features alone), the FL model in eval mode."""
    engine.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():  # an evaluation: no graph to keep (it also warned on every held-out batch)
            for start in range(0, len(samples), batch_size):
                batch = builder(samples[start : start + batch_size])
                out = lm_output(engine, llava, batch, alpha, device, training=False)
                n = caption_token_count(batch.labels)
                total += float(out.loss) * n
                count += n
    finally:
        engine.train()
    return total / max(count, 1)


def module_states(engine, zero_stage: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The backbone's and adapter's state dicts (cloned, on the CPU); under ZeRO-3 gathered on every rank."""
    context = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed

        context = deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    with context:
        student: DWPStudent = engine.module
        backbone = {
            k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
            for k, v in student.backbone.backbone_state_dict().items()
        }
        adapter = {k: v.detach().float().cpu().clone() for k, v in student.adapter.state_dict().items()}
    return backbone, adapter


def optimizer_name(engine) -> str:
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", None)
    name = type(optimizer).__name__
    return f"{name}({type(inner).__name__})" if inner is not None and inner is not optimizer else name
