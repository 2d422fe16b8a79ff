"""The commands that run on the job's ranks under one process group: ``run``, ``federate`` (also with
``--seeds``), ``annotate``, ``pretrain`` and ``compare``. Each run directory is locked before anything is
written there; the process group ends however the command ends."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from contextlib import ExitStack

import torch
import torchvision  # noqa: F401 - before any process group starts its threads (load_libraries says why)

from mllmfl_dist.commands.compare import (
    check_methods,
    check_stage1_world,
    compare_dir,
    compare_options,
    parse_seeds,
    run_compare,
)
from mllmfl_dist.commands.compare_methods import default_methods, parse_methods
from mllmfl_dist.commands.compare_table import results_markdown
from mllmfl_dist.commands.pipeline import planned_stages, run_pipeline
from mllmfl_dist.commands.sweep import mean_std_line, seed_configs, seed_line
from mllmfl_dist.core import dist, preempt, run_lock
from mllmfl_dist.stages.annotate import run_annotate
from mllmfl_dist.stages.deepspeed_setup import accumulation_steps, cpu_accelerator_env, prepare_deepspeed
from mllmfl_dist.stages.federated import run_federated
from mllmfl_dist.stages.pretrain import run_pretrain


def run(cfg, args: argparse.Namespace, stop: preempt.StopRequest) -> int:
    """The command ``args.command`` (one of the above) on this job's ranks; compare's methods and seeds, and
    ``--seeds`` of federate/run, are checked before anything runs. Returns the exit code (0)."""
    if args.command in ("federate", "run") and args.seeds:
        sweep = seed_configs(args.config, args.overrides, parse_seeds(args.seeds, cfg))
        return run_stage(cfg, args.command, stop, sweep=sweep)
    if args.command == "compare":
        methods = parse_methods(args.methods or default_methods(cfg), cfg)
        seeds = parse_seeds(args.seeds, cfg)
        tune, report = compare_options(args, cfg, seeds)
        check_methods(cfg, methods, tune)  # before anything runs
        return run_stage(cfg, args.command, stop, methods, seeds, compare_options=(tune, *report))
    return run_stage(cfg, args.command, stop)


def run_stage(
    cfg,
    command: str,
    stop: preempt.StopRequest,
    methods: Sequence = (),
    seeds: Sequence[int] = (),
    sweep: Sequence = (),
    compare_options: tuple = (None, 3, None),
) -> int:
    """Run ``command`` on this job's ranks; ``sweep``: the per-seed configs of ``federate/run --seeds``;
    ``compare_options``: compare's (TuneSpec or None, last, target)."""
    load_libraries(cfg, command, any(getattr(m, "dwp", False) for m in methods))
    runtime = dist.init_runtime(cfg.dist, stop=stop)
    held = ExitStack()
    try:
        # A world size stage 1's global batch does not split over ends the job here, not after the stages
        # before DWP (annotation; compare's earlier rows) have run.
        if command == "compare":
            check_stage1_world(cfg, list(methods), compare_options[0], runtime.world_size)
        elif command == "run" and "pretrain" in planned_stages(cfg):
            accumulation_steps(cfg.pretrain, runtime.world_size)
        # Every run directory of the command is locked before anything is written there (a sweep's all at once).
        for run_cfg in sweep or [cfg]:
            held.enter_context(run_lock.holding(runtime, run_cfg.run_dir, command))
        if command in ("federate", "run"):
            finals = []
            for run_cfg in sweep or [cfg]:
                final = federate_or_run(run_cfg, command, runtime)
                finals.append(final)
                if sweep and runtime.is_server:
                    print(seed_line(run_cfg, final), flush=True)
            if sweep and runtime.is_server:
                print(mean_std_line(finals))
        elif command == "compare":
            rows = run_compare(cfg, runtime, list(methods), list(seeds), *compare_options)
            if runtime.is_server:
                print(results_markdown(rows), end="")
                print(f"compare: results.md, results.csv, results_per_seed.csv and accuracy.png in {compare_dir(cfg)}")
        elif command == "annotate":
            manifest = run_annotate(cfg, runtime)
            if runtime.is_server:
                print(
                    f"annotate: {manifest['captions_out']} captions from {manifest['images_in']} images, "
                    f"{len(manifest['skipped'])} skipped, {len(manifest['damaged_shards'])} damaged shards; "
                    f"{manifest['images_per_second']:.1f} images/s"
                )
        elif command == "pretrain":
            metrics = run_pretrain(cfg, runtime)
            if runtime.is_server and metrics:
                print(
                    f"pretrain: held-out LM loss with FL features {metrics['heldout_loss_alpha1_step0']:.3f} "
                    f"-> {metrics['heldout_loss_alpha1']:.3f} (CLIP features: {metrics['heldout_loss_alpha0']:.3f})"
                )
        else:
            raise AssertionError(f"unhandled command {command}")
    finally:
        held.close()
        dist.shutdown(runtime)
    return 0


def load_libraries(cfg, command: str, compare_pretrains: bool = False) -> None:
    """Import the command's native libraries before the process group starts its threads. torchvision (and
    DeepSpeed, transformers) imported after gloo's threads exist make a rank abort at exit now and then
    ("terminate called without an active exception", exit -6: 2 of 5 three-process federate runs on the CI
    VM, 0 of 12 with torchvision imported first)."""
    gpu = cfg.dist.backend != "gloo" and torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    cpu_accelerator_env(device)  # before anything imports DeepSpeed: no accelerator guess and warning per rank
    stages = {command} | (set(planned_stages(cfg)) if command in ("run", "compare") else set())
    if compare_pretrains:
        stages.add("pretrain")
    if stages & {"annotate", "pretrain"} or cfg.align.teacher == "llava":
        # Here, not at the top: only the stages that need them, and after cpu_accelerator_env.
        import transformers  # noqa: F401
    if "pretrain" in stages:
        prepare_deepspeed(device, cfg.pretrain.deepspeed.cpu_comm)
        import deepspeed  # noqa: F401


def federate_or_run(cfg, command: str, runtime) -> dict:
    """One ``federate`` or ``run``; the final evaluation on rank 0 ({} elsewhere)."""
    if command == "federate":
        final = run_federated(cfg, runtime)
        if runtime.is_server and final:
            groups = ", ".join(
                f"{g} {final[f'acc_{g}']:.4f}" for g in ("many", "medium", "few") if final.get(f"acc_{g}") is not None
            )
            val = f"; val balanced acc {final['val_acc']:.4f}" if final.get("val_acc") is not None else ""
            print(
                f"round {final['round']}: balanced acc {final['acc']:.4f} (top-1 {final['acc_top1']:.4f}; "
                f"{groups}){val}"
            )
        return final or {}
    summary = run_pipeline(cfg, runtime)
    final = summary.get("federated", {}) if runtime.is_server else {}
    if runtime.is_server:
        print(f"run: report in {cfg.run_dir / 'report'}")
        if final:
            val = f" (val {final['val_acc']:.4f})" if final.get("val_acc") is not None else ""
            print(f"final balanced accuracy {final.get('acc', float('nan')):.4f}{val} after round {final.get('round')}")
    return final
