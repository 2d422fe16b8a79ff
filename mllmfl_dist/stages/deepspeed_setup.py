"""How the DWP stage drives DeepSpeed: its config dict, and a start-up with nothing to compile.

**Config.** :func:`deepspeed_config` builds DeepSpeed's config from ``[pretrain]`` / ``[pretrain.deepspeed]``.
``pretrain.deepspeed.config_file`` names a DeepSpeed JSON of the user's own (offload, ZeRO-3 tuning, ...)
that is merged *under* it: every key our section sets wins (a differing value in the file is named in a
warning), the file adds the rest, nested tables merged key by key. HF-Trainer-style ``"auto"`` values are
refused: DeepSpeed itself does not resolve them.

**Start-up.** On its first ``deepspeed.initialize`` on a CPU, DeepSpeed JIT-compiles its shared-memory
all-reduce op (``deepspeed_shm_comm``; 51 s on a fresh clone, 3 to 5 minutes on a busy machine, again
whenever the venv path changes), and only to speed up the all-reduce of large gradients between CPU ranks of
one node. With ``pretrain.deepspeed.cpu_comm = "gloo"`` (the default) :func:`prepare_deepspeed` marks that
op unavailable in DeepSpeed's own table of compatible ops (``deepspeed.ops.__compatible_ops__``, which
``deepspeed.comm.torch.build_shm_op`` reads; DeepSpeed keeps it as one module-level dict so that edits hold),
and the all-reduce goes through torch's gloo process group like every other collective here. ``"shm"``
restores DeepSpeed's default. On a GPU DeepSpeed never builds the op (nccl). It also sets
``DS_ACCELERATOR=cpu`` on a CPU-only machine (unless set), which DeepSpeed would otherwise guess with a
warning on every rank.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mllmfl_dist.config import ConfigError, PretrainConfig

log = logging.getLogger(__name__)

SHM_COMM_OP = "deepspeed_shm_comm"  # ShareMemCommBuilder.NAME


def cpu_accelerator_env(device: torch.device) -> None:
    """``DS_ACCELERATOR=cpu`` for a CPU run, before deepspeed is imported (a user's own value wins)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


class _SchedulerStartNotice(logging.Filter):
    """DeepSpeed's WarmupLR / WarmupCosineLR constructors read the learning rate before step 0 and warn about
    it on every rank ("Attempting to get learning rate from scheduler before it has started"): noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "before it has started" not in record.getMessage()


def prepare_deepspeed(device: torch.device, cpu_comm: str = "gloo") -> None:
    """Make ``deepspeed.initialize`` start without compiling anything and without noise (module docstring)."""
    cpu_accelerator_env(device)
    import deepspeed.ops

    if device.type == "cpu" and cpu_comm == "gloo":
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    ds_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _SchedulerStartNotice) for f in ds_logger.filters):
        ds_logger.addFilter(_SchedulerStartNotice())


def accumulation_steps(pcfg: PretrainConfig, world_size: int) -> int:
    """Micro-batches each of ``world_size`` data-parallel ranks accumulates per optimizer step:
    ``deepspeed.gradient_accumulation_steps``, or ``global_batch_size / (micro_batch_size * world_size)`` when
    ``global_batch_size`` is set. ConfigError, naming the sizes that would work, when that is not a whole number.

    The data stream gives step ``t`` the same samples whichever way ``G`` splits into ranks and accumulation
    (:func:`mllmfl_dist.stages.pretrain.captions.micro_batch_indices`), so a fixed ``G`` trains the same backbone
    on any world size that divides it, to float reduction order."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not pcfg.global_batch_size:
        return pcfg.deepspeed.gradient_accumulation_steps
    per_step = pcfg.micro_batch_size * world_size
    if pcfg.global_batch_size % per_step:
        ranks = [
            n
            for n in range(1, pcfg.global_batch_size // pcfg.micro_batch_size + 1)
            if pcfg.global_batch_size % (pcfg.micro_batch_size * n) == 0
        ]
        raise ConfigError(
            f"pretrain.global_batch_size = {pcfg.global_batch_size} does not split into micro-batches of "
            f"{pcfg.micro_batch_size} over {world_size} processes; run DWP on {', '.join(map(str, ranks)) or 'no'} "
            f"processes, or change pretrain.global_batch_size (a multiple of {per_step}) or "
            "pretrain.micro_batch_size (either changes the backbone DWP trains)"
        )
    return pcfg.global_batch_size // per_step


def deepspeed_config(pcfg: PretrainConfig, world_size: int, *, torch_optimizer: bool = False) -> dict[str, Any]:
    """The DeepSpeed config dict of ``[pretrain]`` / ``[pretrain.deepspeed]`` for ``world_size`` data-parallel
    ranks.

    ``Adam`` is plain Adam (L2 weight decay: DeepSpeed's ``adam_w_mode`` off), ``AdamW`` decoupled weight
    decay, ``SGD`` torch's SGD. ``torch_optimizer`` (what the stage uses) asks DeepSpeed for torch's
    ``Adam``/``AdamW`` (``torch_adam``) instead of its fused Adam, a JIT-compiled extension.
    ``warmup_steps = 0`` means no warm-up: DeepSpeed's schedulers need at least one warm-up step, so the
    warm-up then starts at the full learning rate. The cosine schedule runs over ``pretrain.steps``.
    """
    ds = pcfg.deepspeed
    accum = accumulation_steps(pcfg, world_size)
    params: dict[str, Any] = {"lr": ds.lr, "weight_decay": ds.weight_decay}
    if ds.optimizer == "Adam":
        params["adam_w_mode"] = False
    if ds.optimizer in ("Adam", "AdamW") and torch_optimizer:
        params["torch_adam"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": pcfg.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": pcfg.micro_batch_size * accum * world_size,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        "optimizer": {"type": ds.optimizer, "params": params},
        "gradient_clipping": ds.gradient_clipping,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # torch optimizers (SGD, torch Adam/AdamW) under ZeRO: DeepSpeed calls them untested, they work.
        "zero_allow_untested_optimizer": True,
    }
    warmup = max(1, ds.warmup_steps)
    if ds.scheduler == "WarmupLR":
        config["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0 if ds.warmup_steps else ds.lr,
                "warmup_max_lr": ds.lr,
                "warmup_num_steps": warmup,
                "warmup_type": "linear",
            },
        }
    elif ds.scheduler == "WarmupCosineLR":
        config["scheduler"] = {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": pcfg.steps,
                "warmup_num_steps": warmup,
                "warmup_min_ratio": 0.0 if ds.warmup_steps else 1.0,
                "warmup_type": "linear",
            },
        }
    elif ds.scheduler != "none":
        raise ValueError(f"unknown scheduler {ds.scheduler!r}")
    return with_user_config(pcfg, config)


def check_precision(precision: str) -> None:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = {"fp32": True, "bf16": accelerator.is_bf16_supported(), "fp16": accelerator.is_fp16_supported()}
    if not supported[precision]:
        allowed = ", ".join(k for k, ok in supported.items() if ok)
        raise ConfigError(
            f"pretrain.deepspeed.precision = {precision!r} is not supported by DeepSpeed on this "
            f"device ({accelerator.device_name()}); choose one of: {allowed}"
        )


def load_user_config(path: str) -> dict[str, Any]:
    """The JSON object of ``pretrain.deepspeed.config_file``; ConfigError if it is missing, not JSON, not an
    object, or holds ``"auto"`` values."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"pretrain.deepspeed.config_file = {path!r}: no such file")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"pretrain.deepspeed.config_file = {path!r}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"pretrain.deepspeed.config_file = {path!r}: must hold a JSON object of DeepSpeed keys")
    auto = [key for key, value in _leaves(data) if value == "auto"]
    if auto:
        raise ConfigError(
            f'pretrain.deepspeed.config_file = {path!r}: {", ".join(auto)} = "auto"; DeepSpeed '
            'does not resolve "auto" (the HF Trainer does): give a value or drop the key'
        )
    return data


def merge_under(user: Mapping[str, Any], ours: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, Any], list[str]]:
    """``user`` with ``ours`` on top: tables merge key by key, any other value of ours replaces the user's.
    Returns the merged dict and the dotted keys where the user's value was replaced by a different one."""
    merged = dict(user)
    replaced = []
    for key, value in ours.items():
        theirs = merged.get(key)
        if isinstance(value, Mapping) and isinstance(theirs, Mapping):
            merged[key], below = merge_under(theirs, value, f"{prefix}{key}.")
            replaced += below
        else:
            if key in merged and theirs != value:
                replaced.append(f"{prefix}{key}")
            merged[key] = value
    return merged, replaced


def with_user_config(pcfg: PretrainConfig, ours: dict[str, Any]) -> dict[str, Any]:
    """``ours`` merged over ``pretrain.deepspeed.config_file`` (unchanged when the key is empty)."""
    path = pcfg.deepspeed.config_file
    if not path:
        return ours
    merged, replaced = merge_under(load_user_config(path), ours)
    if replaced:
        log.warning(
            "pretrain.deepspeed.config_file %s: the config's [pretrain] / [pretrain.deepspeed] settings give %s; "
            "the file's values are not used",
            path,
            ", ".join(replaced),
        )
    return merged


def _leaves(tree: Mapping[str, Any], prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
