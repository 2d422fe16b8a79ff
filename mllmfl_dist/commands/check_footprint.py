"""Estimates, before anything loads, of the peak memory per rank of each stage of a run and of what it writes to disk.

They are arithmetic on the config and on the models' files (:mod:`mllmfl_dist.mllm.model_files`), not
measurements:

* weights: parameter count x bytes per parameter at the stage's dtype (annotation: ``annotate.dtype``; DWP:
  ``pretrain.deepspeed.precision``; the LLaVA teacher: float32, as ``mllm/teachers.py`` loads it);
* generation's KV cache: 2 x layers x key/value width x tokens x batch x beams x bytes;
* DWP's trainable state under ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
  Trillion Parameter Models", sec. 3 and 5): parameters and gradients at 2 bytes with bf16/fp16 (4 with fp32),
  Adam's fp32 master copy, momentum and variance (K = 12 bytes mixed, 8 fp32; SGD 8 / 4); stage 1 splits the
  optimizer state over the data-parallel ranks, stage 2 also the gradients, stage 3 also the parameters;
* activations kept for the backward pass through the frozen LLM: layers x s x b x h x 34 bytes at 16 bits
  (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", eq. 1, without
  the attention-score term, which fused attention does not keep); an upper estimate, since frozen weights
  need no saved inputs for their gradients;
* the FL model: parameters, gradients, SGD momentum, the global model and the flat all-reduce buffer (4 bytes
  each) plus one update per client a rank trains in a round, and its activations for one batch (the sum of
  every module's output size, counted by a forward pass on the ``meta`` device, kept twice for backward); with
  per-client state (SCAFFOLD, FedDyn), the round's state slots and rank 0's in-memory store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mllmfl_dist.mllm.model_files import DTYPE_BYTES, TORCH_DTYPE_BYTES, ModelFiles

GiB = 2**30
PROMPT_TOKENS = 40  # the caption / class prompt around <image>, tokenised (the default prompts: ~20-30)
# transformers' defaults where a LLaVA config.json leaves a key out (llava-1.5-7b-hf's text_config does).
LLAMA_DEFAULTS = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32}
CLIP_VISION_DEFAULTS = {"hidden_size": 768, "image_size": 224, "patch_size": 32}
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# (classes, channels, side) of the fixed-size sources; the others read them from [data].
SOURCE_SHAPES = {
    "cifar10": (10, 3, 32),
    "cifar100": (100, 3, 32),
    "fashion_mnist": (10, 1, 28),
    "imagenet_lt": (1000, 3, None),
}


@dataclass(frozen=True)
class LlavaGeometry:
    """What the estimates read from a LLaVA config.json: language-model layers, width, heads, key/value
    width; image tokens per image (patch grid, plus CLS with the ``full`` select strategy); vision width."""

    layers: int
    hidden: int
    heads: int
    kv_hidden: int
    image_tokens: int
    vision_width: int

    @classmethod
    def from_config(cls, config: dict) -> LlavaGeometry:
        text = {**LLAMA_DEFAULTS, **config.get("text_config", {})}
        vision = {**CLIP_VISION_DEFAULTS, **config.get("vision_config", {})}
        heads = text["num_attention_heads"]
        kv_heads = text.get("num_key_value_heads") or heads
        grid = (vision["image_size"] // vision["patch_size"]) ** 2
        cls_token = 1 if config.get("vision_feature_select_strategy", "default") == "full" else 0
        return cls(
            text["num_hidden_layers"],
            text["hidden_size"],
            heads,
            text["hidden_size"] * kv_heads // heads,
            grid + cls_token,
            vision["hidden_size"],
        )


def dtype_bytes(name: str, model: ModelFiles) -> int | None:
    """Bytes per parameter of a stage's dtype; ``auto``: as stored (None when unknown)."""
    if name in TORCH_DTYPE_BYTES:
        return TORCH_DTYPE_BYTES[name]
    stored = [DTYPE_BYTES[d] for d in model.dtypes if d in DTYPE_BYTES]
    return max(stored) if stored else None


def data_shape(cfg) -> tuple[int, int, int]:
    """(classes, channels, side) of the config's images (shards: the [data] keys, a guess)."""
    classes, channels, side = SOURCE_SHAPES.get(cfg.data.source, (cfg.data.num_classes, cfg.data.channels, None))
    return classes, cfg.model.in_channels or channels, side or cfg.data.image_size


def fl_model_size(cfg, classes: int, channels: int, side: int) -> tuple[int, int, int, int]:
    """(parameters, backbone parameters, feature-map channels, activation elements per image) of the config's
    FL model, built on the ``meta`` device (no memory, no initialisation cost)."""
    import torch

    from mllmfl_dist.fl.models import build_model

    with torch.device("meta"):
        model = build_model(cfg.model.arch, channels, classes, cfg.model.width_scale).eval()
        outputs = []
        hooks = [
            m.register_forward_hook(lambda _m, _i, out: outputs.append(out.numel()))
            for m in model.modules()
            if not list(m.children())
        ]
        model(torch.empty(1, channels, side, side))
        for hook in hooks:
            hook.remove()
    params = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.classifier.parameters())
    return params, params - head, model.map_channels, sum(outputs)


def adapter_params(map_channels: int, geometry: LlavaGeometry) -> int:
    """DWP's TokenAdapter (stages/pretrain/dwp.py): two linear layers to the vision width, and a position embedding per
    image token."""
    width = geometry.vision_width
    return map_channels * width + width + width * width + width + geometry.image_tokens * width


def zero_bytes(trainable: int, precision: str, optimizer: str, stage: int, ranks: int) -> int:
    """Bytes per rank of DWP's parameters, gradients and optimizer state under ZeRO ``stage`` over ``ranks``."""
    element = PRECISION_BYTES[precision]
    mixed = element == 2
    state = (12 if mixed else 8) if optimizer in ("Adam", "AdamW") else (8 if mixed else 4)
    shard = [1, 1, 1]  # parameters, gradients, optimizer state: divided by this
    for part in range(min(stage, 3)):
        shard[2 - part] = ranks
    return math.ceil(trainable * (element / shard[0] + element / shard[1] + state / shard[2]))


def llm_activations(geometry: LlavaGeometry, tokens: int, batch: int, element: int) -> int:
    return geometry.layers * tokens * batch * geometry.hidden * 34 * element // 2


@dataclass
class StageMemory:
    """One stage's estimate per rank: ``sure`` (weights and training state, which must fit) and ``total``
    (with activations and caches); None where a model's size is unknown. ``parts`` says what was counted."""

    stage: str
    sure: int | None
    total: int | None
    parts: str


def client_state_width(cfg, classes: int, channels: int, side: int) -> int:
    """Entries of one client's state (the strategy's ``client_state_shapes`` on the config's FL model, built on
    the ``meta`` device); 0 for a strategy that keeps none, which is then not built."""
    import torch

    from mllmfl_dist.fl.strategies import Strategy, build_strategy, strategy_class
    from mllmfl_dist.fl.models import build_model

    if strategy_class(cfg.federated.strategy).client_state_shapes is Strategy.client_state_shapes:
        return 0
    with torch.device("meta"):
        model = build_model(cfg.model.arch, channels, classes, cfg.model.width_scale)
    shapes = build_strategy(cfg).client_state_shapes(model)
    return sum(math.prod(shape) for shape in shapes.values())


def client_state_bytes(cfg, width: int) -> int:
    """Per rank, for a client state of ``width`` entries: the round's slots in the all_reduce and the broadcast
    (:func:`mllmfl_dist.fl.round_buffers.client_state_slot_bytes`) plus the copy of the broadcast's a rank keeps, and
    on rank 0 the store's in-memory entries (every client's, up to ``federated.client_state_mb``)."""
    from mllmfl_dist.fl.round_buffers import client_state_slot_bytes

    if not width:
        return 0
    fed = cfg.federated
    reduce, broadcast = client_state_slot_bytes(width, fed.clients_per_round)
    store = min(int(fed.client_state_mb * 2**20), fed.num_clients * width * 4)
    return reduce + 2 * broadcast + store


def federate_memory(cfg, params: int, activations: int, client_hosts: int, extra: int = 0) -> int:
    per_round = math.ceil(cfg.federated.clients_per_round / max(client_hosts, 1))
    copies = 4 + (1 if cfg.federated.momentum > 0 else 0) + per_round
    return copies * params * 4 + 2 * activations * cfg.federated.batch_size * 4 + extra


def gib(value: int | None) -> str:
    return "?" if value is None else f"{value / GiB:.1f} GiB"
