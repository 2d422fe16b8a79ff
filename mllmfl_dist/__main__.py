"""Command line: ``python -m mllmfl_dist <command> CONFIG [--set section.key=value ...]``.

Runs as one process, or under ``torchrun --nproc_per_node W`` / ``srun`` as W ranks (rank 0 is the server).
``main(argv)`` is importable, so tests run the whole CLI in-process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

from mllmfl_dist.commands.cli import build_parser
from mllmfl_dist.core import preempt
# Only light modules at import time: `--help` and argument errors must not wait for torch (seconds);
# each command imports what it needs.
from mllmfl_dist.config import load_config
from mllmfl_dist.core.errors import ConfigError, DataError, ModelLoadError, RankLostError, TrainingDivergedError

USAGE_ERROR = 2  # a config, data or model the user can fix
DIVERGED = 3  # training went non-finite; the last checkpoint is kept
RANK_LOST = 4  # a wait on another rank ran out or broke (stopped, hung or killed rank)
INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command ended by Ctrl-C

def _env_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def _setup_logging() -> None:
    from mllmfl_dist.core.progress import quiet_library_bars

    rank = _env_rank()
    # A time on every line: in a SLURM or nohup log it is the only clock there is.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, datefmt="%Y-%m-%d %H:%M:%S",
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    quiet_library_bars(rank)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stop = preempt.StopRequest()
    if args.command in ("run", "annotate", "pretrain", "federate", "compare"):
        stop.install()  # first: a stop request must not kill the process (its default action)
    _setup_logging()
    try:
        if args.command == "shards":
            from mllmfl_dist.commands import shards as shards_cli

            return shards_cli.run(args)
        if args.command == "report":
            return _report(args.run_dir)
        if args.command == "tiny-models":
            return _tiny_models(args)
        # Only the commands that write a run directory need one that can be made (evaluate and probe read it;
        # check reports it in its table).
        cfg = load_config(args.config, args.overrides,
                          check_run_dir=args.command not in ("evaluate", "probe", "check"))
        if args.command in ("check", "run"):
            from mllmfl_dist.commands import check

            if args.command == "check":
                return check.run_check(cfg, args.config, args.for_command, args.nnodes, args.nproc_per_node,
                                       args.gpus_per_node)
            check.refuse_missing(cfg, "run")  # before any process group or file: one line per missing thing
        from mllmfl_dist.tracking.tracker import check_trackers

        check_trackers(cfg.log)
        if args.command in ("federate", "run") and args.seeds:
            from mllmfl_dist.commands.compare import parse_seeds
            from mllmfl_dist.commands.sweep import seed_configs

            sweep = seed_configs(args.config, args.overrides, parse_seeds(args.seeds, cfg))
            return _run_stage(cfg, args.command, stop, sweep=sweep)
        if args.command == "evaluate":
            return _evaluate(cfg, args.checkpoint)
        if args.command == "probe":
            from mllmfl_dist.commands.probe import run_probe

            run_probe(cfg, args.backbones, args.train_set, args.out)
            return 0
        if args.command == "compare":
            from mllmfl_dist.commands.compare import (check_methods, compare_options, default_methods, parse_methods,
                                                      parse_seeds)

            methods = parse_methods(args.methods or default_methods(cfg), cfg)
            seeds = parse_seeds(args.seeds, cfg)
            tune, report = compare_options(args, cfg, seeds)
            check_methods(cfg, methods, tune)  # before anything runs
            return _run_stage(cfg, args.command, stop, methods, seeds, compare_options=(tune, *report))
        return _run_stage(cfg, args.command, stop)
    except (ConfigError, DataError, ModelLoadError) as err:
        return _fail(err, USAGE_ERROR, everywhere=False)
    except TrainingDivergedError as err:
        return _fail(err, DIVERGED, everywhere=False, prefix="training diverged: ")
    except RankLostError as err:
        return _fail(err, RANK_LOST, everywhere=True)
    except preempt.Preempted as stopped:
        return _fail(stopped, preempt.PREEMPTED_EXIT, everywhere=False, label="")
    except KeyboardInterrupt:  # Ctrl-C reaches every rank: one line per node, not a traceback per rank
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the line being written
        from mllmfl_dist.core.preflight import interrupted_message

        what = f"{args.command} {getattr(args, 'config', None) or getattr(args, 'run_dir', '')}".strip()
        return _fail(Exception(interrupted_message(what)), INTERRUPTED, everywhere=False, label="")


def _tiny_models(args) -> int:
    import torch

    from mllmfl_dist.standins.standin_settings import StandinSettings
    from mllmfl_dist.standins.tiny import MODEL_CARD, build_tiny_models
    from mllmfl_dist.stages.deepspeed_setup import cpu_accelerator_env

    # transformers may import DeepSpeed, which would guess the accelerator and warn about it.
    cpu_accelerator_env(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank = _env_rank()
    paths = build_tiny_models(args.directory, train=args.train, settings=StandinSettings(seed=args.seed),
                              progress=rank == 0)
    for name, path in paths.items():
        print(f"{name}: {path}")
    if args.train is not None:
        card = json.loads((paths["llava"].parent / MODEL_CARD).read_text())
        measured = card["measured"]
        print(f"model card: {paths['llava'].parent / MODEL_CARD}: CLIP zero-shot {measured['clip_zero_shot_acc']:.3f}, "
              f"LLaVA captions naming the class {measured['llava_caption_acc']:.3f}, LLaVA teacher "
              f"{measured['llava_teacher_acc']:.3f} ({measured['n_images']} test images); "
              f"trained in {card['train_seconds']:.0f} s")
    return 0


def _fail(err: Exception, code: int, *, everywhere: bool, prefix: str = "", label: str = "error: ") -> int:
    """One line on stderr, and the same message in torchelastic's error file so torchrun's failure block
    carries it. An outcome every rank meets alike (config, data, a diverged round, a preemption stop) is
    printed by one process per node (the first there to meet it: a problem of one node's files still shows,
    and a node prints it once); a lost rank is reported by every rank that saw it."""
    from mllmfl_dist.core.launch import first_to_report

    message = f"mllmfl_dist: {label}{prefix}{err}"
    if everywhere or first_to_report():
        print(message, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        # torchelastic's reply-file format with a plain message: torchrun shows it as the failure's text,
        # where ErrorHandler.record_exception would put a traceback.
        try:
            with open(error_file, "w") as handle:
                json.dump({"message": message, "timestamp": int(time.time())}, handle)
        except OSError:
            pass
    return code


def _run_stage(cfg, command: str, stop: preempt.StopRequest, methods: Sequence = (), seeds: Sequence[int] = (),
               sweep: Sequence = (), compare_options: tuple = (None, 3, None)) -> int:
    """Run ``command`` on this job's ranks; ``sweep``: the per-seed configs of ``federate/run --seeds``;
    ``compare_options``: compare's (TuneSpec or None, last, target)."""
    from contextlib import ExitStack

    from mllmfl_dist.core import dist, run_lock

    _load_libraries(cfg, command, any(getattr(m, "dwp", False) for m in methods))
    runtime = dist.init_runtime(cfg.dist, stop=stop)
    held = ExitStack()
    try:
        # Every run directory of the command is locked before anything is written there (a sweep's all at once).
        for run_cfg in sweep or [cfg]:
            held.enter_context(run_lock.holding(runtime, run_cfg.run_dir, command))
        if command in ("federate", "run"):
            from mllmfl_dist.commands.sweep import mean_std_line, seed_line

            finals = []
            for run_cfg in sweep or [cfg]:
                final = _federate_or_run(run_cfg, command, runtime)
                finals.append(final)
                if sweep and runtime.is_server:
                    print(seed_line(run_cfg, final), flush=True)
            if sweep and runtime.is_server:
                print(mean_std_line(finals))
        elif command == "compare":
            from mllmfl_dist.commands.compare import compare_dir, run_compare
            from mllmfl_dist.commands.compare_table import results_markdown

            rows = run_compare(cfg, runtime, list(methods), list(seeds), *compare_options)
            if runtime.is_server:
                print(results_markdown(rows), end="")
                print(f"compare: results.md, results.csv, results_per_seed.csv and accuracy.png in "
                      f"{compare_dir(cfg)}")
        elif command == "annotate":
            from mllmfl_dist.stages.annotate import run_annotate

            manifest = run_annotate(cfg, runtime)
            if runtime.is_server:
                print(f"annotate: {manifest['captions_out']} captions from {manifest['images_in']} images, "
                      f"{len(manifest['skipped'])} skipped, {len(manifest['damaged_shards'])} damaged shards; "
                      f"{manifest['images_per_second']:.1f} images/s")
        elif command == "pretrain":
            from mllmfl_dist.stages.pretrain import run_pretrain

            metrics = run_pretrain(cfg, runtime)
            if runtime.is_server and metrics:
                print(f"pretrain: held-out LM loss with FL features {metrics['heldout_loss_alpha1_step0']:.3f} "
                      f"-> {metrics['heldout_loss_alpha1']:.3f} (CLIP features: {metrics['heldout_loss_alpha0']:.3f})")
        else:
            raise AssertionError(f"unhandled command {command}")
    finally:
        held.close()
        dist.shutdown(runtime)
    return 0


def _report(run_dir: str) -> int:
    from mllmfl_dist.core.layout import RunLayout
    from mllmfl_dist.core.run_lock import holding_report
    from mllmfl_dist.stages.report import read_run_config, write_report

    layout = RunLayout(run_dir)
    path = layout.root
    if not layout.holds_a_run():
        raise ConfigError(f"report: {path} holds no run (no federated/, annotate/ or pretrain/ folder); give "
                          f"<run.root>/<run.name>, e.g. runs/fmnist_lt (a compare row: runs/X/compare/fedavg/seed0)")
    read_run_config(path)  # a config.toml that cannot be read is refused before the lock makes report/
    with holding_report(layout.report, "report"):
        summary = write_report(path)
    print(f"report: {path / 'report' / 'report.md'} ({', '.join(summary['plots']) or 'no plots'})")
    return 0


def _load_libraries(cfg, command: str, compare_pretrains: bool = False) -> None:
    """Import the command's native libraries before the process group starts its threads. torchvision (and
    DeepSpeed, transformers) imported after gloo's threads exist make a rank abort at exit now and then
    ("terminate called without an active exception", exit -6: 2 of 5 three-process federate runs on the CI
    VM, 0 of 12 with torchvision imported first)."""
    import torch
    import torchvision  # noqa: F401

    from mllmfl_dist.commands.pipeline import planned_stages
    from mllmfl_dist.stages.deepspeed_setup import cpu_accelerator_env, prepare_deepspeed

    gpu = cfg.dist.backend != "gloo" and torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    cpu_accelerator_env(device)  # before anything imports DeepSpeed: no accelerator guess and warning per rank
    stages = {command} | (set(planned_stages(cfg)) if command in ("run", "compare") else set())
    if compare_pretrains:
        stages.add("pretrain")
    if stages & {"annotate", "pretrain"} or cfg.align.teacher == "llava":
        import transformers  # noqa: F401
    if "pretrain" in stages:
        prepare_deepspeed(device, cfg.pretrain.deepspeed.cpu_comm)
        import deepspeed  # noqa: F401


def _federate_or_run(cfg, command: str, runtime) -> dict:
    """One ``federate`` or ``run``; the final evaluation on rank 0 ({} elsewhere)."""
    if command == "federate":
        from mllmfl_dist.stages.federated import run_federated

        final = run_federated(cfg, runtime)
        if runtime.is_server and final:
            groups = ", ".join(f"{g} {final[f'acc_{g}']:.4f}" for g in ("many", "medium", "few")
                               if final.get(f"acc_{g}") is not None)
            val = f"; val balanced acc {final['val_acc']:.4f}" if final.get("val_acc") is not None else ""
            print(f"round {final['round']}: balanced acc {final['acc']:.4f} (top-1 {final['acc_top1']:.4f}; "
                  f"{groups}){val}")
        return final or {}
    from mllmfl_dist.commands.pipeline import run_pipeline

    summary = run_pipeline(cfg, runtime)
    final = summary.get("federated", {}) if runtime.is_server else {}
    if runtime.is_server:
        print(f"run: report in {cfg.run_dir / 'report'}")
        if final:
            val = f" (val {final['val_acc']:.4f})" if final.get("val_acc") is not None else ""
            print(f"final balanced accuracy {final.get('acc', float('nan')):.4f}{val} after round {final.get('round')}")
    return final


def _evaluate(cfg, checkpoint_path: str) -> int:
    from pathlib import Path

    from mllmfl_dist.core import checkpoint
    from mllmfl_dist.fl.evaluate import evaluate_on_splits, imbalance_warning
    from mllmfl_dist.fl.strategies import build_strategy
    from mllmfl_dist.stages.inputs import build_data, build_fl_model

    path = Path(checkpoint_path)
    if not path.is_file():
        raise ConfigError(f"--checkpoint {path}: no such file")
    state = checkpoint.load_or_explain(path, "--checkpoint")
    if not isinstance(state, dict):
        raise ConfigError(f"--checkpoint {path} holds no state dict")
    server_state = None
    if "model" in state and isinstance(state["model"], dict):
        saved_strategy = (state.get("config") or {}).get("federated", {}).get("strategy")
        if saved_strategy not in (None, cfg.federated.strategy):
            raise ConfigError(f"--checkpoint {path} was trained with federated.strategy = {saved_strategy!r}; "
                              f"evaluate it with that strategy (--set federated.strategy={saved_strategy})")
        # "server_optimizer": what checkpoints called the strategy's state before it was called "strategy"
        server_state = state.get("strategy", state.get("server_optimizer"))
        state = state["model"]
    data = build_data(cfg)
    strategy = build_strategy(cfg)
    model = build_fl_model(cfg.model, data, cfg.run.seed, strategy.projection_dim)
    try:
        model.load_state_dict(state)
        if server_state is not None:
            # A training checkpoint: evaluate what the run evaluated (CReFF: the re-trained classifier).
            strategy.load_state_dict(server_state)
            model = strategy.evaluation_model(model)
    except (RuntimeError, KeyError, TypeError) as err:
        raise ConfigError(f"--checkpoint {path} does not fit the config's model ({cfg.model.arch}) and "
                          f"federated.strategy ({cfg.federated.strategy}): {str(err).splitlines()[0]}") from None
    imbalance = imbalance_warning(data.test_set()[1], data.class_names)
    if imbalance:
        logging.getLogger("mllmfl_dist").warning("%s", imbalance)
    report = evaluate_on_splits(data, model, cfg.eval.batch_size, "cpu")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
