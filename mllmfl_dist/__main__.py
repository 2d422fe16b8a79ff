"""Command line: ``python -m mllmfl_dist <command> CONFIG [--set section.key=value ...]``.

Runs as one process, or under ``torchrun --nproc_per_node W`` / ``srun`` as W ranks (rank 0 is the server).
``main(argv)`` is importable, so tests run the whole CLI in-process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

from mllmfl_dist.core import preempt
# Only light modules at import time: `--help` and argument errors must not wait for torch (seconds);
# each command imports what it needs.
from mllmfl_dist.config import load_config
from mllmfl_dist.core.errors import ConfigError, DataError, ModelLoadError, RankLostError, TrainingDivergedError

USAGE_ERROR = 2  # a config, data or model the user can fix
DIVERGED = 3  # training went non-finite; the last checkpoint is kept
RANK_LOST = 4  # a wait on another rank ran out or broke (stopped, hung or killed rank)

DESCRIPTION = """\
Distributed trainer for MLLM-assisted federated learning on long-tailed, heterogeneous image data.

commands:
  run CONFIG          the method end to end in one job: annotate -> pretrain -> federate (with
                      alignment when [align] every > 0) -> report (<run dir>/report/: summary.json and
                      plots). Stages follow from the config; each skips complete work, so a rerun
                      picks up where an interrupted run stopped.
  annotate CONFIG     stage 1a: an MLLM ([annotate] model, e.g. llava-hf/llava-1.5-7b-hf or a local
                      directory) captions the images of WebDataset shards ([annotate] shards) into
                      <run dir>/annotate/ with manifest.json. Whole shards per rank; reruns skip
                      complete shards.
  pretrain CONFIG     stage 1b: Dynamic Weighted Pretraining of the FL backbone against the frozen MLLM
                      on the captions, under DeepSpeed; writes <run dir>/pretrain/backbone.pt.
  federate CONFIG     stage 2: federated finetuning (federated.strategy: fedavg, fedavgm, fedprox,
                      creff, clip2fl) with evaluation,
                      metrics and checkpoints under <run dir>/federated/ (model.pretrained_backbone =
                      "pretrain" starts from stage 1b). Rerunning resumes from the last checkpoint; a
                      finished run is left as it is.
  compare CONFIG --methods fedavg,creff,fedavg+align[none],mllm-llava-fl --seeds 0,1,2
                      each method for each seed on identical data, partition and ranks under
                      <run dir>/compare/<method>/seed<k>/ (resumable one by one), then
                      <run dir>/compare/results.md and results.csv (mean +- std over seeds and per
                      seed) and accuracy.png. A method is <strategy>[+dwp[llava]][+align[<teacher>]]:
                      the strategy from a random-init backbone with alignment off, plus DWP
                      pretraining and/or alignment with that teacher; mllm-llava-fl is
                      fedavg+dwp[llava]+align[llava]; config is the config as written.
  evaluate CONFIG --checkpoint PATH
                      accuracy (balanced = mean per-class "acc", plain top-1 "acc_top1", per class,
                      Many/Medium/Few) of a saved model on the config's test set, printed as JSON.
  report RUN_DIR      write <RUN_DIR>/report/ (summary.json, report.md, plots) for any run directory.
  shards ...          pack an image folder or a data source into WebDataset shards (see shards --help).
  tiny-models DIR     build a tiny random LLaVA and a tiny open_clip model in DIR, loadable like real
                      checkpoints (offline tests and the offline default); with --train CORPUS
                      (e.g. shards/fmnist_web) train knowledge-bearing ones on a captioned corpus
                      instead, on the CPU, with DIR/model_card.json.

<run dir> is <run.root>/<run.name>/ (default runs/<config file stem>/).

Every command takes --set section.key=value (repeatable), typed against the config's dataclasses.
Launch on one process with `python -m mllmfl_dist ...` or on W ranks with
`torchrun --nproc_per_node W -m mllmfl_dist ...` (or srun; see launch/slurm.sbatch).
SIGUSR1 stops federated finetuning after the current round with a checkpoint and exit
code 75 (what Slurm sends before a time limit with --signal); rerunning resumes.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mllmfl_dist", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("config", help="TOML config file (see configs/)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override one config value; repeatable")
        return sub

    sweeps = [add("run", "all stages of the method, then the report, in one job")]
    add("annotate", "caption WebDataset shards with an MLLM (stage 1a)")
    add("pretrain", "Dynamic Weighted Pretraining of the FL backbone under DeepSpeed (stage 1b)")
    sweeps.append(add("federate", "federated finetuning with evaluation, checkpoints and resume"))
    for sweep in sweeps:
        sweep.add_argument("--seeds", default=None,
                           help="comma-separated seeds: one run per seed (run.seed = k; in <run.name>-seed<k>/ unless "
                                "run.name has {run.seed}), a line per seed and mean +- std at the end")
    compare = add("compare", "several methods on identical data and seeds, and a table of the results")
    compare.add_argument("--methods", "--strategies", dest="methods", default=None,
                         help="comma-separated methods, each <strategy>[+dwp[llava]][+align[<teacher>]], "
                              "mllm-llava-fl or config (default: the five baselines, plus config when the "
                              "config runs a stage of the method)")
    compare.add_argument("--seeds", default=None,
                         help="comma-separated seeds, every method runs for each (default: run.seed)")
    evaluate = add("evaluate", "evaluate a saved model on the config's test set")
    evaluate.add_argument("--checkpoint", required=True,
                          help="model_final.pt (a state dict) or checkpoint.pt from a run directory")
    from mllmfl_dist import shards_cli

    shards_cli.add_arguments(commands.add_parser("shards", help="pack images into WebDataset shards",
                                                 description=shards_cli.DESCRIPTION,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter))
    report = commands.add_parser("report", help="write the report of a run directory (summary, plots, report.md)",
                                 description="Write <RUN_DIR>/report/: summary.json, report.md and the plots, "
                                             "from what the run wrote (any run: federate, run, a compare row).")
    report.add_argument("run_dir", help="a run directory (<run.root>/<run.name>), e.g. runs/fmnist_lt")
    tiny = commands.add_parser("tiny-models", help="build tiny LLaVA and open_clip models in DIR (random, or "
                                                   "trained with --train)")
    tiny.add_argument("directory", help="output directory (gets llava/ and clip/)")
    tiny.add_argument("--train", metavar="CORPUS", default=None,
                      help="captioned WebDataset shards (e.g. shards/fmnist_web) to train the stand-ins on; "
                           "without it the models are random")
    tiny.add_argument("--seed", type=int, default=0, help="training seed with --train (default 0)")
    return parser


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
            from mllmfl_dist import shards_cli

            return shards_cli.run(args)
        if args.command == "report":
            return _report(args.run_dir)
        if args.command == "tiny-models":
            return _tiny_models(args)
        cfg = load_config(args.config, args.overrides)
        from mllmfl_dist.tracking.tracker import check_trackers

        check_trackers(cfg.log)
        if args.command in ("federate", "run") and args.seeds:
            from mllmfl_dist.commands.compare import parse_seeds
            from mllmfl_dist.commands.sweep import seed_configs

            sweep = seed_configs(args.config, args.overrides, parse_seeds(args.seeds, cfg))
            return _run_stage(cfg, args.command, stop, sweep=sweep)
        if args.command == "evaluate":
            return _evaluate(cfg, args.checkpoint)
        if args.command == "compare":
            from mllmfl_dist.fl.strategies import build_strategy
            from mllmfl_dist.commands.compare import default_methods, method_config, parse_methods, parse_seeds

            methods = parse_methods(args.methods or default_methods(cfg), cfg)
            seeds = parse_seeds(args.seeds, cfg)
            for method in methods:  # refuse a bad method (or a model it needs that is not there) before anything runs
                build_strategy(method_config(cfg, method)).projection_dim(0)  # only its refusal matters here
            return _run_stage(cfg, args.command, stop, methods, seeds)
        return _run_stage(cfg, args.command, stop)
    except (ConfigError, DataError, ModelLoadError) as err:
        return _fail(err, USAGE_ERROR, everywhere=False)
    except TrainingDivergedError as err:
        return _fail(err, DIVERGED, everywhere=False, prefix="training diverged: ")
    except RankLostError as err:
        return _fail(err, RANK_LOST, everywhere=True)
    except preempt.Preempted as stopped:
        return _fail(stopped, preempt.PREEMPTED_EXIT, everywhere=False, label="")


def _tiny_models(args) -> int:
    import torch

    from mllmfl_dist.models.standin_settings import StandinSettings
    from mllmfl_dist.models.tiny import MODEL_CARD, build_tiny_models
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
               sweep: Sequence = ()) -> int:
    """Run ``command`` on this job's ranks; ``sweep``: the per-seed configs of ``federate/run --seeds``."""
    from mllmfl_dist.core import dist

    _load_libraries(cfg, command, any(getattr(m, "dwp", False) for m in methods))
    runtime = dist.init_runtime(cfg.dist, stop=stop)
    try:
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

            rows = run_compare(cfg, runtime, list(methods), list(seeds))
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
        dist.shutdown(runtime)
    return 0


def _report(run_dir: str) -> int:
    from mllmfl_dist.core.layout import RunLayout
    from mllmfl_dist.stages.report import write_report

    layout = RunLayout(run_dir)
    path = layout.root
    if not layout.holds_a_run():
        raise ConfigError(f"report: {path} holds no run (no federated/, annotate/ or pretrain/ folder); give "
                          f"<run.root>/<run.name>, e.g. runs/fmnist_lt (a compare row: runs/X/compare/fedavg/seed0)")
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
            print(f"round {final['round']}: balanced acc {final['acc']:.4f} (top-1 {final['acc_top1']:.4f}; "
                  f"{groups})")
        return final or {}
    from mllmfl_dist.commands.pipeline import run_pipeline

    summary = run_pipeline(cfg, runtime)
    final = summary.get("federated", {}) if runtime.is_server else {}
    if runtime.is_server:
        print(f"run: report in {cfg.run_dir / 'report'}")
        if final:
            print(f"final balanced accuracy {final.get('acc', float('nan')):.4f} after round {final.get('round')}")
    return final


def _evaluate(cfg, checkpoint_path: str) -> int:
    from pathlib import Path

    from mllmfl_dist.core import checkpoint
    from mllmfl_dist.fl.evaluate import evaluate_on_test_set, imbalance_warning
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
    report = evaluate_on_test_set(data, model, cfg.eval.batch_size, "cpu")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
