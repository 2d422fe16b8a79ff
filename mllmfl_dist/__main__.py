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
from collections.abc import Sequence

from mllmfl_dist.config import ConfigError, load_config
from mllmfl_dist.data import DataError
from mllmfl_dist.models.mllm import ModelLoadError

USAGE_ERROR = 2

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
  compare CONFIG --strategies fedavg,fedavgm,fedprox,creff,clip2fl,mllm
                      each method on identical data, partition, seeds and ranks under
                      <run dir>/compare/<method>/ (resumable per method), then
                      <run dir>/compare/results.md, results.csv and accuracy.png. The baselines run
                      with alignment off and a random-init backbone; mllm runs the config as written.
  evaluate CONFIG --checkpoint PATH
                      accuracy (overall, per class, Many/Medium/Few) of a saved model on the config's
                      balanced test set, printed as JSON.
  shards ...          pack an image folder or a data source into WebDataset shards (see shards --help).
  tiny-models DIR     build a tiny random LLaVA and a tiny open_clip model in DIR, loadable like real
                      checkpoints (offline tests and the offline default); with --train CORPUS
                      (e.g. shards/fmnist_web) train knowledge-bearing ones on a captioned corpus
                      instead, on the CPU, with DIR/model_card.json.

<run dir> is <run.root>/<run.name>/ (default runs/<config file stem>/).

Every command takes --set section.key=value (repeatable), typed against the config's dataclasses.
Launch on one process with `python -m mllmfl_dist ...` or on W ranks with
`torchrun --nproc_per_node W -m mllmfl_dist ...`.
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

    add("run", "all stages of the method, then the report, in one job")
    add("annotate", "caption WebDataset shards with an MLLM (stage 1a)")
    add("pretrain", "Dynamic Weighted Pretraining of the FL backbone under DeepSpeed (stage 1b)")
    add("federate", "federated finetuning with evaluation, checkpoints and resume")
    compare = add("compare", "several methods on identical data and seeds, and a table of the results")
    compare.add_argument("--strategies", default="fedavg,fedavgm,fedprox,creff,clip2fl,mllm",
                         help="comma-separated methods (default: %(default)s)")
    evaluate = add("evaluate", "evaluate a saved model on the config's test set")
    evaluate.add_argument("--checkpoint", required=True,
                          help="model_final.pt (a state dict) or checkpoint.pt from a run directory")
    from mllmfl_dist import shards_cli

    shards_cli.add_arguments(commands.add_parser("shards", help="pack images into WebDataset shards",
                                                 description=shards_cli.DESCRIPTION,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter))
    tiny = commands.add_parser("tiny-models", help="build tiny LLaVA and open_clip models in DIR (random, or "
                                                   "trained with --train)")
    tiny.add_argument("directory", help="output directory (gets llava/ and clip/)")
    tiny.add_argument("--train", metavar="CORPUS", default=None,
                      help="captioned WebDataset shards (e.g. shards/fmnist_web) to train the stand-ins on; "
                           "without it the models are random")
    tiny.add_argument("--seed", type=int, default=0, help="training seed with --train (default 0)")
    return parser


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        if args.command == "shards":
            from mllmfl_dist import shards_cli

            return shards_cli.run(args)
        if args.command == "tiny-models":
            return _tiny_models(args)
        cfg = load_config(args.config, args.overrides)
        if args.command == "evaluate":
            return _evaluate(cfg, args.checkpoint)
        if args.command == "compare":
            from mllmfl_dist.stages.compare import method_config, parse_methods

            from mllmfl_dist.fl.strategies import STRATEGIES

            methods = parse_methods(args.strategies)
            for method in methods:  # refuse a bad method (or a CLIP that is not there) before anything runs
                method_cfg = method_config(cfg, method)
                STRATEGIES[method_cfg.federated.strategy].projection_dim(method_cfg)
            return _run_stage(cfg, args.command, methods)
        return _run_stage(cfg, args.command)
    except (ConfigError, DataError, ModelLoadError) as err:
        print(f"mllmfl_dist: error: {err}", file=sys.stderr)
        return USAGE_ERROR


def _tiny_models(args) -> int:
    from mllmfl_dist.models.standin_settings import StandinSettings
    from mllmfl_dist.models.tiny import MODEL_CARD, build_tiny_models

    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
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


def _run_stage(cfg, command: str, methods: Sequence[str] = ()) -> int:
    from mllmfl_dist import dist

    runtime = dist.init_runtime(cfg.dist)
    try:
        if command == "federate":
            from mllmfl_dist.stages.federated import run_federated

            final = run_federated(cfg, runtime)
            if runtime.is_server and final:
                groups = ", ".join(f"{g} {final[f'acc_{g}']:.4f}" for g in ("many", "medium", "few")
                                   if final.get(f"acc_{g}") is not None)
                print(f"round {final['round']}: acc {final['acc']:.4f} ({groups})")
        elif command == "run":
            from mllmfl_dist.pipeline import run_pipeline

            summary = run_pipeline(cfg, runtime)
            if runtime.is_server:
                print(f"run: report in {cfg.run_dir / 'report'}")
                final = summary.get("federated", {})
                if final:
                    print(f"final accuracy {final.get('acc', float('nan')):.4f} after round {final.get('round')}")
        elif command == "compare":
            from mllmfl_dist.stages.compare import compare_dir, results_markdown, run_compare

            rows = run_compare(cfg, runtime, list(methods))
            if runtime.is_server:
                print(results_markdown(rows), end="")
                print(f"compare: results.md, results.csv and accuracy.png in {compare_dir(cfg)}")
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


def _evaluate(cfg, checkpoint_path: str) -> int:
    from pathlib import Path

    from mllmfl_dist import checkpoint
    from mllmfl_dist.fl.strategies import build_strategy
    from mllmfl_dist.stages.federated import build_data, build_fl_model, evaluate_global

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
        server_state = state.get("server_optimizer")
        state = state["model"]
    data = build_data(cfg)
    model = build_fl_model(cfg, data)
    try:
        model.load_state_dict(state)
        if server_state is not None:
            # A training checkpoint: evaluate what the run evaluated (CReFF: the re-trained classifier).
            strategy = build_strategy(cfg)
            strategy.load_state_dict(server_state)
            model = strategy.evaluation_model(model)
    except (RuntimeError, KeyError, TypeError) as err:
        raise ConfigError(f"--checkpoint {path} does not fit the config's model ({cfg.model.arch}) and "
                          f"federated.strategy ({cfg.federated.strategy}): {str(err).splitlines()[0]}") from None
    report = evaluate_global(cfg, data, model, "cpu")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
