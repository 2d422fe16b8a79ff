"""DWP's DeepSpeed checkpoints: which one a rerun resumes from, and loading and saving them safely.

Layout under ``<run dir>/pretrain/deepspeed/``: one directory per checkpoint, named by its tag
``global_step<N>`` (N = the DeepSpeed engine's global step), and ``latest``, the newest tag, written after
every rank's files of that tag are complete (so a directory newer than ``latest`` is a save a crash cut
short). The newest :data:`KEEP_CHECKPOINTS` are kept, so an intact older one is there when the newest is
damaged.

Nothing in a run directory is unpickled with a full unpickler, although DeepSpeed's own loader would
(``torch.load(weights_only=False)``):

- :func:`find_resume_point` (rank 0, before any model is built) accepts only what this trainer writes:
  ``latest`` must name ``global_step<N>``; the tag must be a real directory right inside the checkpoint
  directory, holding no symbolic link; every ``.pt`` file in it must load with ``weights_only=True`` (plus
  the few DeepSpeed classes of :func:`deepspeed_safe_globals`); the model-states file must be at step N.
  The caller checks the saved config against the current one before DeepSpeed loads anything.
- :class:`SafeCheckpointEngine` stands in for the engine's checkpoint engine: DeepSpeed's own loads go
  through the same ``weights_only`` loading, its saves through :func:`mllmfl_dist.core.checkpoint.save_atomic`.

A file that only a full unpickler would read is refused in one line naming it, never loaded and never
moved. A damaged checkpoint (an empty, truncated or corrupt file after a power loss, or a missing file)
is moved aside to ``<tag>.damaged`` with a warning and the previous one is used; a missing or unreadable
``latest`` falls back to the newest intact checkpoint. With none intact the stage refuses to start over
on its own: the message names the directory to move away.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllmfl_dist.config import Config, ConfigError
from mllmfl_dist.config.resume import PRETRAIN, differences, refuse_changed_config
from mllmfl_dist.core import checkpoint, dist

log = logging.getLogger(__name__)

LATEST = "latest"
TAG = re.compile(r"global_step(\d+)")
# The file every rank's resume reads: mp_rank_00_model_states.pt (ZeRO 0-2), zero_pp_rank_0_... (ZeRO-3).
MODEL_STATES = re.compile(r"(zero_pp_rank_0_)?mp_rank_00_model_states\.pt")
DAMAGED_SUFFIX = ".damaged"
KEEP_CHECKPOINTS = 2  # checkpoint tags kept on disk (the newest ones)


def deepspeed_safe_globals() -> list[type]:
    """The classes besides tensors and plain containers that DeepSpeed's checkpoint files hold (ZeRO and
    bf16/fp16 optimizer states: the loss scaler, the ZeRO stage enum, parameter fragment addresses). They
    are plain records; allowing them by name lets ``weights_only`` loading read real DeepSpeed state."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@dataclass(frozen=True)
class ResumePoint:
    tag: str
    step: int
    client_state: dict[str, Any]  # the model-states file's entries (DeepSpeed's and this stage's)


def tag_dirs(ds_dir: Path) -> dict[int, Path]:
    """``{step: directory}`` of the checkpoint tags in ``ds_dir``; an entry with a tag's name that is not a
    plain directory (a symbolic link, a file) is refused."""
    tags = {}
    for entry in sorted(ds_dir.iterdir()) if ds_dir.is_dir() else []:
        match = TAG.fullmatch(entry.name)
        if match is None:
            continue
        if entry.is_symlink() or not entry.is_dir():
            raise ConfigError(
                f"{entry} is not a plain directory (DWP writes its checkpoints as directories, never "
                f"links); move it out of {ds_dir}"
            )
        tags[int(match[1])] = entry
    return tags


def _read_latest(ds_dir: Path, tags: dict[int, Path]) -> tuple[int | None, str]:
    """The step ``latest`` names, or None with why it cannot be used (missing, empty, a missing tag)."""
    path = ds_dir / LATEST
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise ConfigError(f"{path} is not a plain file; move it out of {ds_dir}")
    if not path.exists():
        return None, f"{path} is missing"
    try:
        text = path.read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    if not text:
        return None, f"{path} is empty or unreadable"
    match = TAG.fullmatch(text)
    if match is None:
        # Not damage: something else wrote it (a path, another trainer's tag). Never follow it.
        raise ConfigError(
            f"{path} names {text[:80]!r}, not a checkpoint tag this trainer writes (global_step<N> "
            f"in {ds_dir}); move {ds_dir} away to start DWP over"
        )
    if int(match[1]) not in tags:
        return None, f"{path} names {text}, which is missing"
    return int(match[1]), ""


def _verify(tag_dir: Path, step: int, safe_globals: list[type]) -> tuple[dict[str, Any] | None, str]:
    """Load every ``.pt`` file of a tag with ``weights_only``: ``(model-states entries, "")`` when intact,
    ``(None, what is damaged)`` otherwise. A file a full unpickler alone would read, a link or a step that
    differs from the tag's is refused (ConfigError): those are not damage, they were put there."""
    entries = sorted(tag_dir.iterdir())
    for entry in entries:
        if entry.is_symlink():
            raise ConfigError(
                f"{entry} is a symbolic link; DWP's checkpoints hold plain files only. Move "
                f"{tag_dir} out of {tag_dir.parent} to resume from an older checkpoint"
            )
    files = [e for e in entries if e.is_file() and e.name.endswith(".pt")]
    states = [f for f in files if MODEL_STATES.fullmatch(f.name)]
    if not states:
        return None, f"{tag_dir} has no model-states file"
    loaded = {}
    for path in files:
        try:
            loaded[path] = checkpoint.load(path, safe_globals)
        except Exception as err:  # noqa: BLE001 - pickle, zip and weights_only errors have no common base
            reason = checkpoint.unreadable_reason(path, err)
            if "only a full unpickler" in reason:
                raise ConfigError(
                    f"{path} {reason}; it was not written by this trainer: move {tag_dir} out of "
                    f"{tag_dir.parent} (or delete it) to resume from an older checkpoint"
                ) from None
            return None, f"{path.name} {reason}"
        if path not in states:
            del loaded[path]  # verified; DeepSpeed reads it again itself
    state = loaded[states[0]]
    if not isinstance(state, dict) or state.get("global_steps") != step:
        found = state.get("global_steps") if isinstance(state, dict) else type(state).__name__
        raise ConfigError(
            f"{states[0]} is at step {found!r}, but its directory says {step}: it was not written "
            f"there by this trainer; move {tag_dir} out of {tag_dir.parent}"
        )
    return state, ""


def _set_aside(tag_dir: Path, why: str) -> None:
    target = tag_dir.with_name(tag_dir.name + DAMAGED_SUFFIX)
    n = 0
    while target.exists():
        n += 1
        target = tag_dir.with_name(f"{tag_dir.name}{DAMAGED_SUFFIX}.{n}")
    tag_dir.rename(target)
    log.warning(
        "pretrain: %s cannot be resumed (%s); moved to %s (delete it when you no longer need it)",
        tag_dir.name,
        why,
        target.name,
    )


def find_resume_point(ds_dir: Path) -> ResumePoint | None:
    """Where a rerun resumes (None: no checkpoint, start at step 0); run on rank 0 before anything loads.
    Damaged checkpoints are set aside with a warning; see the module docstring for what is refused."""
    if ds_dir.is_symlink() or (ds_dir.exists() and not ds_dir.is_dir()):
        raise ConfigError(f"{ds_dir} is not a plain directory; move it away")
    tags = tag_dirs(ds_dir)
    latest, problem = _read_latest(ds_dir, tags) if ds_dir.is_dir() else (None, "")
    if not tags:
        if (ds_dir / LATEST).exists():
            raise ConfigError(
                f"{ds_dir / LATEST} exists but {ds_dir} holds no checkpoint directory; move {ds_dir} "
                "away to start DWP over"
            )
        return None
    newer = []
    if latest is None:
        log.warning("pretrain: %s; resuming from the newest intact checkpoint in %s", problem, ds_dir)
        order = sorted(tags, reverse=True)
    else:
        order = sorted((s for s in tags if s <= latest), reverse=True)
        newer = [(tags[s], f"newer than {LATEST}: a save cut short") for s in tags if s > latest]
    safe_globals = deepspeed_safe_globals()
    damaged = []
    for step in order:
        state, damage = _verify(tags[step], step, safe_globals)
        if state is not None:
            break
        damaged.append((tags[step], damage))
    else:
        raise ConfigError(
            f"no intact DeepSpeed checkpoint in {ds_dir} ({'; '.join(d for _, d in damaged)}); "
            f"nothing was deleted: move {ds_dir} away to start DWP over"
        )
    for tag_dir, why in newer + damaged:
        _set_aside(tag_dir, why)
    return ResumePoint(tags[step].name, step, state)


def check_resume(cfg: Config, client_state: dict[str, Any], ds_dir: Path, dp_world: int) -> None:
    """Refuse a resume whose saved config or number of data-parallel ranks differs where it matters."""
    saved = client_state.get("config")
    if not saved:
        return
    saved_world = client_state.get("data_parallel_ranks", dp_world)
    if saved_world != dp_world:
        # The global batch and each rank's slice of the data stream depend on the number of ranks.
        raise ConfigError(
            f"{ds_dir} was written by {saved_world} data-parallel ranks; resume it with "
            f"{saved_world} processes, or delete {ds_dir.parent} to start over"
        )
    refuse_changed_config(ds_dir, differences(saved, cfg.to_dict(), PRETRAIN), f"delete {ds_dir.parent}")


def adapter_shapes(client_state: dict[str, Any]) -> dict[str, list[int]]:
    """``{name: shape}`` of the adapter's parameters in a model-states file (``{}`` where it holds no full
    module, as under ZeRO-3): the LLaVA geometry the checkpoint was trained against."""
    module = client_state.get("module")
    if not isinstance(module, dict):
        return {}
    return {k: list(v.shape) for k, v in module.items() if k.startswith("adapter.") and hasattr(v, "shape")}


def _tokens(shape: list[int] | None) -> str:
    # adapter.pos is [1, grid cells, vision width]
    return f"{shape[1]} visual tokens of width {shape[2]}" if shape and len(shape) == 3 else f"shape {shape}"


def check_adapter_geometry(saved: dict[str, list[int]], student: Any, tag_dir: Path, model: str) -> None:
    """Refuse, in one line naming both shapes, a resume whose adapter was trained against another LLaVA
    geometry (patch grid, vision width) or another FL backbone than the ones loaded now (ConfigError)."""
    current = {f"adapter.{k}": list(v.shape) for k, v in student.adapter.state_dict().items()}
    if not saved or saved == current:
        return
    if saved.get("adapter.pos") != current.get("adapter.pos"):
        raise ConfigError(
            f"{tag_dir}: DWP's adapter was trained against a LLaVA with "
            f"{_tokens(saved.get('adapter.pos'))}, but {model} gives "
            f"{_tokens(current.get('adapter.pos'))}; resume with the LLaVA it was trained "
            f"against, or delete {tag_dir.parent.parent} to start over"
        )
    differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    raise ConfigError(
        f"{tag_dir}: DWP's adapter {differ[0]} is {saved.get(differ[0])} in the checkpoint, "
        f"{current.get(differ[0])} for this FL model and LLaVA; resume with the same model.arch / "
        f"model.width_scale, or delete {tag_dir.parent.parent} to start over"
    )


class SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine with its loads made ``weights_only`` (DeepSpeed's own unpickles
    everything) and its saves atomic (temporary file, fsync, rename); everything else is the wrapped
    engine's."""

    def __init__(self, inner: Any, safe_globals: list[type]) -> None:
        self._inner = inner
        self._safe_globals = safe_globals

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return checkpoint.load_or_explain(path, "DeepSpeed checkpoint", self._safe_globals)

    def save(self, state_dict: Any, path: str) -> None:
        checkpoint.save_atomic(state_dict, path)


def install_safe_engine(engine: Any) -> None:
    """Route the DeepSpeed ``engine``'s checkpoint loads and saves through :class:`SafeCheckpointEngine`."""
    if not isinstance(engine.checkpoint_engine, SafeCheckpointEngine):
        engine.checkpoint_engine = SafeCheckpointEngine(engine.checkpoint_engine, deepspeed_safe_globals())


def save_checkpoint(engine: Any, ds_dir: Path, cfg: Config, state: dict[str, Any], runtime: dist.Runtime) -> None:
    """Every rank saves its part of tag ``global_step<N>``; then rank 0 points ``latest`` at it (atomically,
    once DeepSpeed's closing barrier says every rank's files are complete) and drops the oldest tags."""
    install_safe_engine(engine)
    client_state = {**state, "config": cfg.to_dict(), "data_parallel_ranks": runtime.world_size}
    tag = f"global_step{engine.global_steps}"
    engine.save_checkpoint(str(ds_dir), tag=tag, client_state=client_state, save_latest=False)
    if runtime.is_server:
        with checkpoint.atomic_writer(ds_dir / LATEST, "w") as handle:
            handle.write(tag)  # DeepSpeed's own format: the tag, no newline
        tags = tag_dirs(ds_dir)
        for step in sorted(tags)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(tags[step], ignore_errors=True)
