"""The DWP stage from start to end: skip when finished, pick and check the resume point, load LLaVA and
the data, train under DeepSpeed with checkpoints, write the backbone, the adapter and ``metrics.json``."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from mllmfl_dist.config import Config, ConfigError
from mllmfl_dist.core import checkpoint, dist
from mllmfl_dist.data.images import ImageBounds
from mllmfl_dist.stages.pretrain.dwp import (
    alpha_at,
)
from mllmfl_dist.stages.deepspeed_setup import check_precision, deepspeed_config, prepare_deepspeed
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
from mllmfl_dist.mllm.llava import load_llava, vision_side

log = logging.getLogger(__name__)


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

    resume_tag, saved_adapter = dist.server_decides(runtime, resume_point,
                                                    "rank 0's choice of the DWP checkpoint to resume",
                                                    catch=(ConfigError,))

    prepare_deepspeed(runtime.device, pcfg.deepspeed.cpu_comm)  # before the import: nothing to JIT-compile
    import deepspeed

    check_precision(pcfg.deepspeed.precision)
    samples, skipped = load_captioned(shards_pattern(cfg), ImageBounds.of(pcfg, "pretrain"))
    heldout, train = split_heldout(samples, pcfg.heldout)

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    device = runtime.device
    llava, processor = load_llava(model_name(cfg), dtype=PRECISION_DTYPES[pcfg.deepspeed.precision],
                                  device=device, device_map="")
    llava.eval().requires_grad_(False)
    student, fl_input = build_student(cfg, llava, runtime)
    if resume_tag is not None:  # before DeepSpeed's load, whose size mismatch would be a traceback
        check_adapter_geometry(saved_adapter, student, ds_dir / resume_tag, model_name(cfg))
    builder = BatchBuilder(processor, pcfg.prompt, pcfg.max_caption_tokens, fl_input,
                           side=max(vision_side(llava), fl_input.size))
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
    match_buffer_dtype(engine.module)
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
            loss = lm_output(engine, llava, batch, alpha, device, training=True).loss
            stop_if_non_finite(runtime, loss, engine.global_steps + 1, cfg)
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
    backbone_state, adapter_state = module_states(engine, pcfg.deepspeed.zero_stage)
    metrics = {}
    if runtime.is_server:
        seconds = state["train_seconds"]
        metrics = {
            "loss": state["loss"],
            "heldout_loss_alpha1_step0": state["heldout_loss_alpha1_step0"],
            "heldout_loss_alpha1": final_alpha1,
            "heldout_loss_alpha0": final_alpha0,
            # linear probe of the backbone (and of its random init) on the server's labelled holdout
            "probe": dwp_probe(cfg, backbone_state, device),
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
            "deepspeed": {"engine": type(engine).__name__, "optimizer": optimizer_name(engine),
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
