"""CLIP2FL's frozen teacher: zero-shot logits of every client sample, computed once and cached on disk.

The teacher is frozen and sees the un-augmented image, so its logits for a sample never change: they are
computed once per run (the samples split evenly over all ranks, then summed into one tensor on every
rank over the control group) and stored by rank 0 as ``<cache_dir>/clip2fl-teacher-<key16>.pt``. The key
is a sha256 over the teacher's settings (model, pretrained tag, templates, the logit scale setting, class
names, the open_clip version, and the size and modification time of a local weights file), and the data (every
client sample's index, label and pixel bytes), so a changed model or data set does not reuse a stale
file. A later run of the same config (a resume, a rerun) finds the file, loads no CLIP model and
broadcasts the logits from rank 0. The class text embeddings the server's contrast needs, and the logit
scale the teacher resolved, are stored beside the logits. The scale setting 0 ("the model's own learned
scale") resolves to a number fixed by the weights, which the key already names, so the key determines the
resolved scale either way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from mllmfl_dist.core import dist
from mllmfl_dist.core.cache import content_key, read_cache, write_cache
from mllmfl_dist.core.errors import ConfigError, ModelLoadError
from mllmfl_dist.data import ArrayClientData, ClientData
from mllmfl_dist.data.images import to_pil
from mllmfl_dist.mllm import clip_teacher, teachers
from mllmfl_dist.mllm.llava import weights_identity

if TYPE_CHECKING:
    from mllmfl_dist.config.strategy_sections import Clip2flConfig

log = logging.getLogger(__name__)

_CACHE_VERSION = 2  # 2: the file holds the resolved logit scale


@dataclass
class TeacherLogits:
    """Zero-shot logits of the client samples, addressable by training-array index."""

    indices: np.ndarray  # sorted training-array indices of every client sample
    logits: torch.Tensor  # float32 [len(indices), C]
    text_embeddings: torch.Tensor | None  # float32 [C, E], L2-normalised (rank 0 only)
    logit_scale: float | None = None  # the scale the logits were computed at (rank 0 only)

    def __post_init__(self) -> None:
        self._lookup = np.full(int(self.indices.max()) + 1 if len(self.indices) else 0, -1, dtype=np.int64)
        self._lookup[self.indices] = np.arange(len(self.indices))

    def rows(self, sample_indices: np.ndarray) -> torch.Tensor:
        return self.logits[torch.from_numpy(self._lookup[sample_indices])]


def client_samples(data: ClientData) -> np.ndarray:
    """Sorted training-array indices of every client's samples."""
    if not isinstance(data, ArrayClientData):
        raise ConfigError(
            "federated.strategy = 'clip2fl' needs an array data source (teacher logits are cached per training sample)"
        )
    return np.unique(np.concatenate([data.client_indices(c) for c in range(data.num_clients)]))


def cache_key(ccfg: Clip2flConfig, data: ArrayClientData, indices: np.ndarray) -> str:
    import open_clip

    meta = {
        "version": _CACHE_VERSION,
        "model": ccfg.model,
        "pretrained": ccfg.pretrained,
        "templates": ccfg.templates,
        "logit_scale": ccfg.logit_scale,
        "class_names": list(data.class_names),
        "open_clip": open_clip.__version__,
        "weights": weights_identity(ccfg.model, ccfg.pretrained),
    }
    return content_key(meta, _sample_bytes(data, indices))


def _sample_bytes(data: ArrayClientData, indices: np.ndarray) -> Iterator[bytes]:
    yield indices.astype(np.int64).tobytes()
    step = 4096  # in chunks: the images of a large source are never gathered into one copy
    for start in range(0, len(indices), step):
        images, labels = data.samples(indices[start : start + step])
        yield labels.numpy().astype(np.int64).tobytes()
        yield images.contiguous().numpy().tobytes()


def cache_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"clip2fl-teacher-{key[:16]}.pt"


def teacher_logits(
    ccfg: Clip2flConfig, data: ArrayClientData, runtime: dist.Runtime, cache_dir: Path, progress: bool = True
) -> TeacherLogits:
    """Every client sample's teacher logits on every rank (and the text embeddings on rank 0)."""
    indices = client_samples(data)
    stored: dict[str, Any] | None = None

    def look_up() -> tuple[bool, Path, str]:
        nonlocal stored
        key = cache_key(ccfg, data, indices)
        path = cache_path(cache_dir, key)
        stored = read_cache(
            path,
            key,
            lambda s: tuple(s["logits"].shape) == (len(indices), data.num_classes) and "logit_scale" in s,
            "clip2fl teacher cache",
        )
        return stored is not None, path, key

    found, path, key = dist.server_decides(
        runtime,
        look_up,
        "rank 0's look-up of the clip2fl teacher cache",
        catch=(Exception,),
        as_error=lambda message: ModelLoadError(f"clip2fl teacher cache ({cache_dir}): {message}"),
    )
    if found:
        logits = stored["logits"] if stored is not None else torch.zeros(len(indices), data.num_classes)
        dist.broadcast_control_(runtime, logits)
        text = stored["text_embeddings"] if stored is not None else None
        return TeacherLogits(indices, logits, text, float(stored["logit_scale"]) if stored is not None else None)

    logits, text, scale = compute_teacher_logits(ccfg, data, indices, runtime, progress)
    if runtime.is_server:
        try:
            write_cache(path, key, {"logits": logits, "text_embeddings": text, "logit_scale": scale})
            log.info("clip2fl: teacher logits of %d samples cached in %s", len(indices), path)
        except OSError as err:  # the run goes on; only a later run pays for the teacher again
            log.warning("clip2fl: could not cache the teacher logits in %s (%s)", path, err)
    return TeacherLogits(indices, logits, text, scale if runtime.is_server else None)


def compute_teacher_logits(
    ccfg: Clip2flConfig, data: ArrayClientData, indices: np.ndarray, runtime: dist.Runtime, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """Run the CLIP teacher: each rank its contiguous share of ``indices``, summed over ranks. Returns the
    logits ``[len(indices), C]`` on every rank, the text embeddings (rank 0; None elsewhere) and the logit scale
    (``clip2fl.logit_scale``, or the model's own learned scale where that is 0)."""
    templates = teachers._templates(ccfg.templates)
    bounds = np.linspace(0, len(indices), runtime.world_size + 1).astype(int)
    mine = indices[bounds[runtime.rank] : bounds[runtime.rank + 1]]
    logits = torch.zeros(len(indices), data.num_classes)
    text = scale = None
    failure = None
    try:
        clip, preprocess, tokenizer = clip_teacher.load_clip(ccfg.model, ccfg.pretrained, device=runtime.device)
        scale = clip_teacher.resolve_logit_scale(clip, ccfg.logit_scale)
        if runtime.is_server:
            log.info(
                "clip2fl: teacher logit scale %.4g (%s)",
                scale,
                "clip2fl.logit_scale" if ccfg.logit_scale > 0 else "the model's own learned scale",
            )
        text = clip_teacher.zero_shot_classifier(clip, tokenizer, data.class_names, templates).float().cpu()
        step = ccfg.teacher_batch_size
        bar = tqdm(
            total=len(mine),
            desc="clip2fl teacher",
            unit="img",
            dynamic_ncols=True,
            disable=not (runtime.is_server and progress),
        )
        with torch.no_grad():
            for start in range(0, len(mine), step):
                images, _ = data.samples(mine[start : start + step])
                row = bounds[runtime.rank] + start
                logits[row : row + len(images)] = teachers.clip_teacher_logits(
                    clip,
                    preprocess,
                    tokenizer,
                    [to_pil(im) for im in images],
                    data.class_names,
                    templates,
                    batch_size=step,
                    logit_scale=scale,
                    classifier=text,
                )
                bar.update(len(images))
        bar.close()
        del clip
    except Exception as err:  # noqa: BLE001 - reaches every rank below, so none waits forever
        failure = str(err) if isinstance(err, ModelLoadError) else f"{type(err).__name__}: {err}"
    failures = [f for f in dist.gather_objects(runtime, failure) if f]
    if failures:
        raise ModelLoadError(f"clip2fl teacher ({ccfg.model}): {failures[0]}")
    dist.all_reduce_control_(runtime, logits)
    return logits, (text if runtime.is_server else None), scale


def client_labels(data: ArrayClientData, indices: np.ndarray) -> torch.Tensor:
    """The labels ``[len(indices)]`` (int64) of the training samples at ``indices``, read in chunks."""
    step = 4096
    return torch.cat([data.samples(indices[start : start + step])[1].long() for start in range(0, len(indices), step)])
