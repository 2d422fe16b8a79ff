"""The DWP stage from start to end, in named steps: check the settings, skip when finished, pick and check the
resume point, load LLaVA and the data, build the DeepSpeed engine, restore the checkpoint, train with
checkpoints, write the backbone, the adapter and ``metrics.json``; and the stage's protocol object."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mllmfl_dist.config import Config, ConfigError
from mllmfl_dist.core import checkpoint, dist
from mllmfl_dist.data.images import ImageBounds
from mllmfl_dist.stages.pretrain.dwp import (
    alpha_at,
)
from mllmfl_dist.stages.deepspeed_setup import (
    accumulation_steps,
    check_precision,
    deepspeed_config,
    prepare_deepspeed,
)
from mllmfl_dist.stages.pretrain.batches import BatchBuilder
from mllmfl_dist.stages.pretrain.captions import (
    ADAPTER_NAME,
    BACKBONE_NAME,
    DEEPSPEED_DIR,
    METRICS_NAME,
    PRECISION_DTYPES,
    load_captioned,
    micro_batch_indices,
    model_name,
    shards_pattern,
    split_heldout,
    stage_dir,
)
from mllmfl_dist.stages.pretrain.engine import (
    build_student,
    heldout_loss,
    lm_output,
    match_buffer_dtype,
    module_states,
    optimizer_name,
    stop_if_non_finite,
)
from mllmfl_dist.stages.pretrain.probe import dwp_probe
from mllmfl_dist.stages.pretrain.report import PretrainReport
from mllmfl_dist.stages.pretrain.resume import (
    adapter_shapes,
    check_adapter_geometry,
    check_resume,
    find_resume_point,
    install_safe_engine,
    save_checkpoint,
    tag_dirs,
)
from mllmfl_dist.stages.pretrain.status import finished, pretrain_outputs, pretrain_status
from mllmfl_dist.stages.protocol import StageStatus
from mllmfl_dist.mllm.llava import load_llava, vision_side

log = logging.getLogger(__name__)


def run_pretrain(
    cfg: Config, runtime: dist.Runtime, *, progress: bool = True, stop_at: int | None = None
) -> dict[str, Any]:
    """Run (or resume, or skip if finished) DWP; returns ``metrics.json``'s content on rank 0, ``{}`` elsewhere.

    ``stop_at``: end after this global step, with a DeepSpeed checkpoint there and no final outputs, as if
    the job had been stopped (tests; time-sliced jobs). A rerun continues from it.
    """
    _check_settings(cfg, runtime)
    out = stage_dir(cfg)
    done = _finished_metrics(out, runtime)
    if done is not None:
        return done
    resume_tag, saved_adapter = _resume_point(cfg, runtime, out)
    dwp = _load(cfg, runtime, out, resume_tag, saved_adapter)
    _build_engine(dwp)
    start = _restore(dwp, resume_tag)
    end = cfg.pretrain.steps if stop_at is None else min(cfg.pretrain.steps, stop_at)
    report = _train(dwp, start, end, progress)
    if dwp.engine.global_steps < cfg.pretrain.steps:  # stopped early (stop_at): the checkpoint is the output
        report.close()
        dist.stage_barrier(runtime)
        return {"stopped_at": dwp.engine.global_steps, "loss": dwp.state["loss"]} if runtime.is_server else {}
    return _finish(dwp, report)


@dataclass
class _DWP:
    """What the steps of one DWP run share: the settings, the data, the frozen LLaVA, the student and its engine,
    and the state that rides along in the checkpoints."""

    cfg: Config
    runtime: dist.Runtime
    out: Path
    samples: list[Any]
    skipped: list[Any]
    heldout: list[Any]
    train: list[Any]
    llava: Any
    builder: BatchBuilder
    fl_input: Any
    student: Any
    engine: Any = None
    ds_config: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(
        default_factory=lambda: {
            "loss": [],
            "heldout_loss_alpha1_step0": None,
            "train_seconds": 0.0,
            "train_samples": 0,
        }
    )

    @property
    def ds_dir(self) -> Path:
        return self.out / DEEPSPEED_DIR


def _check_settings(cfg: Config, runtime: dist.Runtime) -> None:
    """Refuse the ranks DeepSpeed cannot checkpoint, a world size the global batch does not split over and a
    missing model (ConfigError)."""
    if cfg.pretrain.ranks == "rank0" and runtime.world_size > 1:
        raise ConfigError(
            f"pretrain.ranks = 'rank0' with {runtime.world_size} processes is not supported: DeepSpeed "
            "synchronises checkpoints over the whole process group (engine.save_checkpoint barriers on every "
            "rank), so rank 0 cannot train alone inside a multi-process job. Use pretrain.ranks = 'all' (every "
            "rank a data-parallel rank) or run the pretrain stage as one process"
        )
    accumulation_steps(cfg.pretrain, runtime.world_size)  # before the model loads: a world that does not fit
    if not model_name(cfg):
        raise ConfigError(
            "pretrain.model and annotate.model are empty; set pretrain.model to a hub id (e.g. "
            "llava-hf/llava-1.5-7b-hf) or a directory (e.g. one made by "
            "`python -m mllmfl_dist tiny-models DIR`)"
        )


def _finished_metrics(out: Path, runtime: dist.Runtime) -> dict[str, Any] | None:
    """``metrics.json`` (``{}`` off rank 0) when rank 0 finds the stage finished, else None."""
    if not dist.server_decides(runtime, lambda: finished(out), "rank 0's check of a finished DWP stage"):
        return None
    metrics: dict[str, Any] = {}
    if runtime.is_server:
        log.info("%s is complete; nothing to train. Delete it to pretrain again.", out)
        metrics = json.loads((out / METRICS_NAME).read_text())
    dist.stage_barrier(runtime)
    return metrics


def _resume_point(cfg: Config, runtime: dist.Runtime, out: Path) -> tuple[str | None, dict[str, list[int]]]:
    """(tag to resume from or None, the saved adapter's shapes). Rank 0 picks the checkpoint and checks its config
    before any model is loaded (and before DeepSpeed reads a file); every rank hears the verdict, so a refusal
    ends them all alike."""
    ds_dir = out / DEEPSPEED_DIR

    def resume_point() -> tuple[str | None, dict[str, list[int]]]:
        try:
            # Temporary files of saves a killed job cut short (no rank of this job writes there yet).
            checkpoint.remove_stale_temps(out, ds_dir, *tag_dirs(ds_dir).values())
            point = find_resume_point(ds_dir)
        except OSError as err:  # an unreadable directory
            raise ConfigError(f"{ds_dir}: {err}") from None
        if point is not None:
            check_resume(cfg, point.client_state, ds_dir, runtime.world_size)
        return (point.tag, adapter_shapes(point.client_state)) if point else (None, {})

    return dist.server_decides(
        runtime, resume_point, "rank 0's choice of the DWP checkpoint to resume", catch=(ConfigError,)
    )


def _load(
    cfg: Config, runtime: dist.Runtime, out: Path, resume_tag: str | None, saved_adapter: dict[str, list[int]]
) -> _DWP:
    """The captioned data, the frozen LLaVA, the student (backbone + adapter) and the batch builder."""
    pcfg = cfg.pretrain
    prepare_deepspeed(runtime.device, pcfg.deepspeed.cpu_comm)  # before the import: nothing to JIT-compile
    import deepspeed  # noqa: F401 - imported where it always was, before LLaVA loads

    check_precision(pcfg.deepspeed.precision)
    samples, skipped = load_captioned(shards_pattern(cfg), ImageBounds.of(pcfg, "pretrain"))
    heldout, train = split_heldout(samples, pcfg.heldout)

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    llava, processor = load_llava(
        model_name(cfg), dtype=PRECISION_DTYPES[pcfg.deepspeed.precision], device=runtime.device, device_map=""
    )
    llava.eval().requires_grad_(False)
    student, fl_input = build_student(cfg, llava, runtime)
    if resume_tag is not None:  # before DeepSpeed's load, whose size mismatch would be a traceback
        check_adapter_geometry(saved_adapter, student, out / DEEPSPEED_DIR / resume_tag, model_name(cfg))
    builder = BatchBuilder(
        processor, pcfg.prompt, pcfg.max_caption_tokens, fl_input, side=max(vision_side(llava), fl_input.size)
    )
    # Every rank checks every caption before training, so a bad prompt ends all ranks together instead of
    # one rank mid-run while the others wait in a gradient all-reduce.
    builder.check_captions([sample.caption for sample in samples])
    return _DWP(cfg, runtime, out, samples, skipped, heldout, train, llava, builder, fl_input, student)


def _build_engine(dwp: _DWP) -> None:
    """The DeepSpeed engine around the student, every rank a data-parallel rank."""
    import deepspeed

    dist.ensure_process_group(dwp.runtime)
    # torch's Adam/AdamW through DeepSpeed on every device: nothing to compile (DeepSpeed's fused/CPU Adam is
    # a JIT-built extension: minutes on a CPU, and it needs the CUDA toolkit on a GPU node).
    dwp.ds_config = deepspeed_config(dwp.cfg.pretrain, dwp.runtime.world_size, torch_optimizer=True)
    dwp.student.to(dwp.runtime.device)
    dwp.engine, _, _, _ = deepspeed.initialize(
        model=dwp.student, model_parameters=list(dwp.student.parameters()), config=dwp.ds_config
    )
    match_buffer_dtype(dwp.engine.module)
    install_safe_engine(dwp.engine)  # DeepSpeed's loads weights_only, its saves atomic


def _restore(dwp: _DWP, resume_tag: str | None) -> int:
    """Load the checkpoint to resume from (if any) into the engine and the state; the step to start at. The
    held-out loss at step 0 is measured once, before the first step of a fresh run."""
    engine, state, ds_dir, pcfg = dwp.engine, dwp.state, dwp.ds_dir, dwp.cfg.pretrain
    if resume_tag is not None:
        path, client_state = engine.load_checkpoint(str(ds_dir), tag=resume_tag)
        if path is None:
            raise ConfigError(
                f"cannot load the DeepSpeed checkpoint {ds_dir / resume_tag}; move it away to resume from an older one"
            )
        state.update({k: client_state[k] for k in state if k in client_state})
        state["loss"] = [r for r in state["loss"] if r["step"] <= engine.global_steps]
    start = engine.global_steps
    if start > pcfg.steps:
        raise ConfigError(
            f"{ds_dir} is at step {start}, past pretrain.steps = {pcfg.steps}; raise "
            "pretrain.steps or delete the directory to start over"
        )
    if start and dwp.runtime.is_server:
        log.info("resuming DWP from %s at step %d", ds_dir, start)
    if state["heldout_loss_alpha1_step0"] is None:
        state["heldout_loss_alpha1_step0"] = heldout_loss(
            engine, dwp.llava, dwp.builder, dwp.heldout, 1.0, pcfg.micro_batch_size, dwp.runtime.device
        )
    return start


def _train(dwp: _DWP, start: int, end: int, progress: bool) -> PretrainReport:
    """Steps ``start`` to ``end``, with a DeepSpeed checkpoint every ``checkpoint_every`` steps and at ``end``;
    returns the open report (the loss log and progress)."""
    cfg, runtime, engine, state = dwp.cfg, dwp.runtime, dwp.engine, dwp.state
    pcfg, device, dp_world, dp_rank = cfg.pretrain, runtime.device, runtime.world_size, runtime.rank
    # what the engine was built with (deepspeed_config), not recomputed: one source for the batch per step
    accum, global_batch = dwp.ds_config["gradient_accumulation_steps"], dwp.ds_config["train_batch_size"]
    batch_size = pcfg.micro_batch_size
    report = PretrainReport(
        cfg,
        runtime,
        dwp.out,
        start,
        state["heldout_loss_alpha1_step0"],
        global_batch=global_batch,
        progress=progress,
    )
    engine.train()
    for step in range(start, end):
        alpha = alpha_at(step, pcfg.steps, pcfg.alpha_start, pcfg.alpha_schedule, pcfg.ramp_fraction)
        began = time.perf_counter()
        losses = []
        for micro in range(accum):
            idx = micro_batch_indices(
                len(dwp.train),
                cfg.run.seed,
                step,
                micro,
                micro_batch_size=batch_size,
                grad_accum=accum,
                dp_rank=dp_rank,
                dp_world=dp_world,
            )
            batch = dwp.builder([dwp.train[i] for i in idx])
            loss = lm_output(engine, dwp.llava, batch, alpha, device, training=True).loss
            stop_if_non_finite(runtime, loss, engine.global_steps + 1, cfg)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        state["train_seconds"] += time.perf_counter() - began
        state["train_samples"] += global_batch
        record = {"step": engine.global_steps, "loss": sum(losses) / len(losses), "alpha": alpha}
        state["loss"].append(record)
        report.step(record, time.perf_counter() - began)
        done = engine.global_steps
        if done % pcfg.checkpoint_every == 0 or done == end:
            save_checkpoint(engine, dwp.ds_dir, cfg, state, runtime)
    return report


def _finish(dwp: _DWP, report: PretrainReport) -> dict[str, Any]:
    """The final held-out losses (every rank), then on rank 0 the backbone, the adapter and, last (it marks the
    stage finished), ``metrics.json`` with the outputs' digests; returns the metrics on rank 0."""
    pcfg, runtime, out = dwp.cfg.pretrain, dwp.runtime, dwp.out
    args = (dwp.engine, dwp.llava, dwp.builder, dwp.heldout)
    final_alpha1 = heldout_loss(*args, 1.0, pcfg.micro_batch_size, runtime.device)
    final_alpha0 = heldout_loss(*args, 0.0, pcfg.micro_batch_size, runtime.device)
    backbone_state, adapter_state = module_states(dwp.engine, pcfg.deepspeed.zero_stage)
    metrics: dict[str, Any] = {}
    if runtime.is_server:
        metrics = _metrics(dwp, final_alpha1, final_alpha0, backbone_state)
        checkpoint.save_atomic(backbone_state, out / BACKBONE_NAME)
        checkpoint.save_atomic(adapter_state, out / ADAPTER_NAME)
        # What marks the stage finished: the outputs' digests, so a torn or replaced file is not taken as done.
        metrics["outputs"] = {
            name: checkpoint.file_identity(out / name, digest=True) for name in (BACKBONE_NAME, ADAPTER_NAME)
        }
        metrics = json.loads(json.dumps(metrics))  # what metrics.json holds (lists, not tuples)
        # last: it marks the stage as finished
        checkpoint.write_text_atomic(out / METRICS_NAME, json.dumps(metrics, indent=2))
    report.close(metrics)
    dist.stage_barrier(runtime)
    return metrics


def _metrics(dwp: _DWP, final_alpha1: float, final_alpha0: float, backbone_state: dict[str, Any]) -> dict[str, Any]:
    """``metrics.json``'s content (without the outputs' digests), rank 0."""
    cfg, runtime, engine, state = dwp.cfg, dwp.runtime, dwp.engine, dwp.state
    pcfg, dp_world, global_batch = cfg.pretrain, runtime.world_size, dwp.ds_config["train_batch_size"]
    seconds = state["train_seconds"]
    return {
        "loss": state["loss"],
        "heldout_loss_alpha1_step0": state["heldout_loss_alpha1_step0"],
        "heldout_loss_alpha1": final_alpha1,
        "heldout_loss_alpha0": final_alpha0,
        # linear probe of the backbone (and of its random init) on the server's labelled holdout
        "probe": dwp_probe(cfg, backbone_state, runtime.device),
        "samples_per_second": state["train_samples"] / seconds if seconds > 0 else 0.0,
        "train_seconds": seconds,
        "train_samples": state["train_samples"],
        "steps": engine.global_steps,
        "world_size": runtime.world_size,
        "data_parallel_ranks": dp_world,
        "global_batch_size": global_batch,
        "captioned_samples": len(dwp.samples),
        "heldout_samples": len(dwp.heldout),
        "train_samples_distinct": len(dwp.train),
        "skipped_samples": len(dwp.skipped),
        "skipped": dwp.skipped[:100],
        "model": model_name(cfg),
        "shards": shards_pattern(cfg),
        "fl_input": dataclasses.asdict(dwp.fl_input),
        "deepspeed": {
            "engine": type(engine).__name__,
            "optimizer": optimizer_name(engine),
            "global_steps": engine.global_steps,
            "zero_stage": pcfg.deepspeed.zero_stage,
            "precision": pcfg.deepspeed.precision,
            "config": dwp.ds_config,
        },
    }


class PretrainStage:
    """DWP through the stage protocol (:mod:`mllmfl_dist.stages.protocol`); its markers are described in
    :mod:`mllmfl_dist.stages.pretrain.status`."""

    name = "pretrain"

    def outputs(self, cfg: Config) -> list[Path]:
        return pretrain_outputs(cfg)

    def status(self, cfg: Config) -> StageStatus:
        return pretrain_status(cfg)

    def run(self, cfg: Config, runtime: dist.Runtime) -> dict[str, Any]:
        return run_pretrain(cfg, runtime)
