"""Stage 1a: an MLLM (LLaVA) captions unlabeled images stored as WebDataset shards.

Work is split by whole shards over the configured ranks (``annotate.ranks``: ``rank0`` or ``all``);
ranks with nothing to do wait on the long-timeout control group. Every input shard gives one annotated
output shard of the same name under ``<run dir>/annotate/`` (caption in ``.txt``; ``.json`` with the
model id, prompt and generation settings) and a ``<name>.done.json`` record, written last, so a rerun
skips shards that are complete. The record holds the size and modification time of the input shard it
was made from and of the output it wrote: an input replaced since (say, a damaged shard re-downloaded as
the message advises) or an output lost or cut since is annotated again. A corrupt image, one over
``annotate.max_image_pixels`` / ``annotate.max_image_aspect_ratio`` (checked on its header, before decoding)
and a tar member outside any sample are skipped and listed; a damaged (truncated) shard is reported by name,
its readable samples are captioned, and the other shards still finish. Images are decoded no larger than
twice the vision tower's side (:func:`mllmfl_dist.data.images.decode_image`), which bounds a batch's pixels.
``manifest.json`` sums the records of all shards.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mllmfl_dist.core import dist
from mllmfl_dist.core.errors import DataError
from mllmfl_dist.core.checkpoint import file_identity, remove_stale_temps, same_file, write_text_atomic
from mllmfl_dist.config import AnnotateConfig, Config, ConfigError
from mllmfl_dist.data.images import ImageBounds, UnusableImageError, decode_image
from mllmfl_dist.mllm.captioning import Generation, caption_batch
from mllmfl_dist.data.shards import ShardError, expand_shards, iter_samples, write_shard
from mllmfl_dist.core.seeds import TAG_ANNOTATE, derive_seed
from mllmfl_dist.core.progress import show_bars
from mllmfl_dist.mllm.llava import load_llava, vision_side
from mllmfl_dist.stages.protocol import COMPLETE, FRESH, RESUME, StageStatus

log = logging.getLogger(__name__)

DONE_SUFFIX = ".done.json"


def assign_shards(shards: Sequence[Path], ranks: Sequence[int]) -> dict[int, list[Path]]:
    """Whole shards, round-robin over the working ranks, in sorted shard order."""
    plan: dict[int, list[Path]] = {rank: [] for rank in ranks}
    for i, shard in enumerate(shards):
        plan[ranks[i % len(ranks)]].append(shard)
    return plan


def _complete(record_path: Path, shard: Path, settings: dict[str, Any], *, quiet: bool = False) -> bool:
    """Whether ``shard`` was annotated from this very file (same size and modification time) with the same
    model and settings, and its output is still the file the record describes. A record made with other
    settings is refused rather than silently kept next to a manifest that names the new settings."""
    if not record_path.exists():
        return False
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        if not quiet:
            log.warning("annotate: %s is unreadable; annotating %s again", record_path, shard.name)
        return False
    if not isinstance(record, dict) or record.get("source") != str(shard) or record.get("settings") != settings:
        found = record if isinstance(record, dict) else {}
        raise ConfigError(
            f"{record_path.parent} holds captions of {found.get('source')} made with other "
            f"annotation settings ({found.get('settings')}); use another run.name or delete "
            f"{record_path.parent} to annotate again"
        )
    output = record_path.parent / shard.name
    if "source_file" not in record:  # an earlier version's record: trust it unless the input is newer
        return shard.stat().st_mtime_ns <= record_path.stat().st_mtime_ns and (
            output.is_file() or not record.get("captions_out")
        )
    if not same_file(shard, record["source_file"]):
        if not quiet:
            log.info("annotate: %s changed since it was annotated; annotating it again", shard)
        return False
    if record.get("output_file") is not None and not same_file(output, record["output_file"]):
        if not quiet:
            log.warning(
                "annotate: %s is not the file its record describes (lost or cut since); annotating %s again",
                output,
                shard.name,
            )
        return False
    return True


def run_annotate(cfg: Config, runtime: dist.Runtime, *, progress: bool = True) -> dict[str, Any]:
    """Annotate the configured shards (skipping complete ones); returns the manifest on rank 0."""
    acfg = cfg.annotate
    if not acfg.model:
        raise ConfigError(
            "annotate.model is empty; set it to a hub id (e.g. llava-hf/llava-1.5-7b-hf) or a "
            "directory (e.g. one made by `python -m mllmfl_dist tiny-models DIR`)"
        )
    if not acfg.shards:
        raise ConfigError("annotate.shards is empty; set it to a glob or brace pattern of WebDataset shards")
    out = cfg.run_dir / "annotate"
    shards = expand_shards(acfg.shards)
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"annotate.shards matches shards with the same file name in different folders; "
            f"outputs would collide: {acfg.shards}"
        )
    working = [0] if acfg.ranks == "rank0" else list(range(runtime.world_size))
    mine = assign_shards(shards, working).get(runtime.rank, [])
    # Temporary files of this rank's own outputs that a killed job left (no other rank writes those).
    remove_stale_temps(
        out,
        targets=[name for s in mine for name in (s.name, s.name + DONE_SUFFIX)]
        + (["manifest.json"] if runtime.is_server else []),
    )
    settings = {"model": acfg.model, **asdict(Generation.from_config(acfg))}
    refusal, todo = None, []
    try:
        todo = [s for s in mine if not _complete(out / (s.name + DONE_SUFFIX), s, settings)]
    except ConfigError as err:
        refusal = str(err)
    # A rank whose finished shards were made with other settings ends every rank, not only itself.
    refusals = [r for r in dist.gather_objects(runtime, refusal, "every rank's check of its finished shards") if r]
    if refusals:
        raise ConfigError(refusals[0])

    if todo:
        out.mkdir(parents=True, exist_ok=True)

        model, processor = load_llava(acfg.model, dtype=acfg.dtype, device=runtime.device, device_map=acfg.device_map)
        model.eval()
        generation = Generation.from_config(acfg)
        bar = tqdm(
            desc=f"annotate (rank {runtime.rank})",
            unit="img",
            dynamic_ncols=True,
            disable=not (progress and runtime.is_server and show_bars(cfg.log)),
        )
        for shard in todo:
            # Sampled decoding draws from torch's generator: seed it per shard so captions do not depend
            # on which rank annotates the shard or on what it annotated before.
            torch.manual_seed(derive_seed(cfg.run.seed, TAG_ANNOTATE, shards.index(shard)))
            record = _annotate_shard(
                shard, out, model, processor, generation, acfg, bar, runtime.rank, vision_side(model)
            )
            write_text_atomic(out / (shard.name + DONE_SUFFIX), json.dumps({**record, "settings": settings}, indent=2))
        bar.close()
    elif mine:
        log.info("annotate: all %d shards of rank %d are complete; nothing to do", len(mine), runtime.rank)

    # Each rank reads its own records, so the manifest does not assume a shared file system.
    records = [json.loads((out / (s.name + DONE_SUFFIX)).read_text()) for s in mine]
    everything = dist.gather_objects(runtime, records)
    manifest: dict[str, Any] = {}
    if runtime.is_server:
        manifest = build_manifest([r for rank_records in everything for r in rank_records], acfg, working)
        write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2))
        log.info("annotate: %d captions from %d images in %s", manifest["captions_out"], manifest["images_in"], out)
    dist.stage_barrier(runtime)
    return manifest


def _annotate_shard(
    shard: Path, out: Path, model, processor, generation: Generation, acfg: AnnotateConfig, bar, rank: int, side: int
) -> dict[str, Any]:
    started = time.perf_counter()
    source_file = file_identity(shard)  # before reading: a change while we read shows at the next run
    skipped: list[dict[str, Any]] = []
    images_in = 0
    truncated = None
    written: list[dict[str, Any]] = []
    pending: list[tuple[dict[str, Any], Any]] = []
    meta = {"model": acfg.model, **asdict(generation)}
    bounds = ImageBounds.of(acfg, "annotate")

    def flush() -> None:
        captions = caption_batch(model, processor, [image for _, image in pending], generation)
        for (sample, _), caption in zip(pending, captions):
            written.append(
                {
                    "key": sample["key"],
                    "image_bytes": sample["image_bytes"],
                    "image_ext": sample["image_ext"],
                    "cls": sample["cls"],
                    "txt": caption,
                    "json": {**(sample["json"] or {}), "annotation": meta},
                }
            )
        bar.update(len(pending))
        pending.clear()

    try:
        for sample in iter_samples(shard):
            images_in += 1
            if sample.get("error") or sample.get("image_bytes") is None:
                skipped.append(
                    {"shard": shard.name, "key": sample["key"], "reason": sample.get("error") or "no image member"}
                )
                continue
            try:
                image = decode_image(sample["image_bytes"], bounds, side=side).convert("RGB")
            except UnusableImageError as err:
                skipped.append({"shard": shard.name, "key": sample["key"], "reason": str(err)})
                continue
            pending.append((sample, image))
            if len(pending) == acfg.batch_size:
                flush()
    except ShardError as err:
        truncated = str(err)
        log.warning("annotate: %s; its readable samples are kept", err)
    if pending:
        flush()
    output = out / shard.name
    if written:
        write_shard(written, output)
    else:
        output.unlink(missing_ok=True)  # captions of an earlier version of this input must not outlive it
    seconds = time.perf_counter() - started
    return {
        "shard": shard.name,
        "source": str(shard),
        "rank": rank,
        "images_in": images_in,
        "captions_out": len(written),
        "skipped": skipped,
        "damaged": truncated,
        "seconds": seconds,
        "source_file": source_file,
        "output_file": file_identity(output) if written else None,
    }


def build_manifest(records: list[dict[str, Any]], acfg: AnnotateConfig, working: Sequence[int]) -> dict[str, Any]:
    """Totals over shard records: ``images_in == captions_out + len(skipped)``. ``seconds`` is the busiest
    rank's generation time (ranks work in parallel), so ``images_per_second`` is the stage's throughput
    however many reruns it took."""
    records = sorted(records, key=lambda r: r["shard"])
    captions = sum(r["captions_out"] for r in records)
    seconds_by_rank: dict[int, float] = {}
    for record in records:
        seconds_by_rank[record["rank"]] = seconds_by_rank.get(record["rank"], 0.0) + record["seconds"]
    seconds = max(seconds_by_rank.values(), default=0.0)
    return {
        "model": acfg.model,
        "prompt": acfg.prompt,
        "batch_size": acfg.batch_size,
        "ranks": list(working),
        "shards": [{k: r[k] for k in ("shard", "images_in", "captions_out", "seconds", "damaged")} for r in records],
        "images_in": sum(r["images_in"] for r in records),
        "captions_out": captions,
        "skipped": [s for r in records for s in r["skipped"]],
        "damaged_shards": [{"shard": r["shard"], "reason": r["damaged"]} for r in records if r["damaged"]],
        "seconds": seconds,
        "images_per_second": captions / seconds if seconds > 0 else 0.0,
    }


class AnnotateStage:
    """Annotation through the stage protocol (:mod:`mllmfl_dist.stages.protocol`): complete when every configured
    shard has a ``.done.json`` record that a rerun would keep and ``manifest.json`` sums exactly those shards
    with the configured model and prompt."""

    name = "annotate"

    def outputs(self, cfg: Config) -> list[Path]:
        out = cfg.paths.annotate
        return [out / "manifest.json", *(out / (s.name + DONE_SUFFIX) for s in expand_shards(cfg.annotate.shards))]

    def status(self, cfg: Config) -> StageStatus:
        acfg, out = cfg.annotate, cfg.paths.annotate
        try:
            shards = expand_shards(acfg.shards)
        except DataError as err:  # the stage refuses it in its own words
            return StageStatus(FRESH, f"annotate.shards: {err}")
        if len({s.name for s in shards}) != len(shards):
            return StageStatus(FRESH, f"{len(shards)} shards, some with the same file name")
        settings = {"model": acfg.model, **asdict(Generation.from_config(acfg))}
        try:
            done = sum(_complete(out / (s.name + DONE_SUFFIX), s, settings, quiet=True) for s in shards)
        except ConfigError:
            return StageStatus(RESUME, f"{out}, which holds records of other annotation settings")
        if done == len(shards) and self._manifest_lists(out / "manifest.json", [s.name for s in shards], acfg):
            return StageStatus(COMPLETE, f"{done} shards annotated in {out}")
        if done or (out.is_dir() and any(out.glob("*" + DONE_SUFFIX))):
            return StageStatus(RESUME, f"{out}: {done} of {len(shards)} shards annotated")
        return StageStatus(FRESH, f"{len(shards)} shards to annotate into {out}")

    @staticmethod
    def _manifest_lists(path: Path, names: list[str], acfg: AnnotateConfig) -> bool:
        try:
            manifest = json.loads(path.read_text())
            listed = sorted(entry["shard"] for entry in manifest["shards"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return (
            listed == sorted(names)
            and manifest.get("model") == acfg.model
            and manifest.get("prompt") == acfg.prompt
            and manifest.get("batch_size") == acfg.batch_size
        )

    def run(self, cfg: Config, runtime: dist.Runtime) -> dict[str, Any]:
        return run_annotate(cfg, runtime)
