"""The command line's parser and its description of every command (``python -m mllmfl_dist --help``).

Kept apart from :mod:`mllmfl_dist.__main__`, which runs the commands, and free of torch imports so that
``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import textwrap

from mllmfl_dist.commands import probe, shards
from mllmfl_dist.config.plugins import builtin_strategy_names

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
{federate}
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
                      Many/Medium/Few) of a saved model on the config's test set, printed as JSON,
                      with "val_acc", "val_acc_top1", ... beside it when data.val_per_class > 0.
  probe CONFIG --backbone SPEC [--backbone SPEC ...]
                      linear-probe accuracy of frozen backbones (a model or backbone file, random:SEED,
                      clip:MODEL) on the config's data, one table (<run dir>/probe/probe.json and .md).
  check CONFIG        what a run of CONFIG uses and whether it is there, loading no weights: each model
                      (local folder or Hugging Face cache: parameters, dtype), the data files, every
                      shard pattern, the run directory and free disk, the world, and estimated memory
                      per rank of each stage; exit 2 with one line per missing thing. `run` makes the
                      same checks of files first.
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


def description() -> str:
    """The top-level help; the strategy list comes from the registry, so it names every built-in one."""
    federate = textwrap.fill(
        f"stage 2: federated finetuning (federated.strategy: {', '.join(builtin_strategy_names())} or a plug-in) "
        "with evaluation, metrics and checkpoints under <run dir>/federated/ (model.pretrained_backbone = "
        '"pretrain" starts from stage 1b). Rerunning resumes from the last checkpoint; a finished run is left as '
        "it is.",
        width=102,
        initial_indent="  federate CONFIG     ",
        subsequent_indent=" " * 22,
    )
    return DESCRIPTION.replace("{federate}", federate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mllmfl_dist", description=description(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("config", help="TOML config file (see configs/)")
        sub.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="SECTION.KEY=VALUE",
            help="override one config value; repeatable",
        )
        return sub

    sweeps = [add("run", "all stages of the method, then the report, in one job")]
    add("annotate", "caption WebDataset shards with an MLLM (stage 1a)")
    add("pretrain", "Dynamic Weighted Pretraining of the FL backbone under DeepSpeed (stage 1b)")
    sweeps.append(add("federate", "federated finetuning with evaluation, checkpoints and resume"))
    for sweep in sweeps:
        sweep.add_argument(
            "--seeds",
            default=None,
            help="comma-separated seeds: one run per seed (run.seed = k; in <run.name>-seed<k>/ unless "
            "run.name has {run.seed}), a line per seed and mean +- std at the end",
        )
    compare = add("compare", "several methods on identical data and seeds, and a table of the results")
    compare.add_argument(
        "--methods",
        "--strategies",
        dest="methods",
        default=None,
        help="comma-separated methods, each <strategy>[+dwp[llava]][+align[<teacher>]], "
        "mllm-llava-fl or config (default: the five baselines, plus config when the "
        "config runs a stage of the method)",
    )
    compare.add_argument(
        "--seeds", default=None, help="comma-separated seeds, every method runs for each (default: run.seed)"
    )
    compare.add_argument(
        "--tune",
        action="append",
        default=[],
        metavar="SECTION.KEY=V1,V2,...",
        help="values to tune a key over, per method (repeatable; see README); chosen on "
        "validation accuracy, into <run dir>/compare/tuning.json",
    )
    compare.add_argument("--tune-budget", type=int, default=3, help="configurations per method at most (default 3)")
    compare.add_argument("--tune-seeds", help="tuning seeds (default 100,101, or the next ones not in --seeds)")
    compare.add_argument(
        "--tune-last", type=int, default=3, help="select on the mean val accuracy of the last N evaluations (default 3)"
    )
    compare.add_argument("--last", type=int, default=3, help="also average the last N evaluations (default 3)")
    compare.add_argument("--target", type=float, metavar="ACC", help="add the first round at balanced test acc ACC")
    evaluate = add("evaluate", "evaluate a saved model on the config's test set")
    evaluate.add_argument(
        "--checkpoint", required=True, help="model_final.pt (a state dict) or checkpoint.pt from a run directory"
    )
    check = add("check", "what a run of the config uses and whether it is there (no weights loaded)")
    check.add_argument(
        "--for",
        dest="for_command",
        default="run",
        choices=("run", "annotate", "pretrain", "federate", "compare"),
        help="the command to check for (default run: every stage the config plans)",
    )
    check.add_argument("--nnodes", type=int, help="nodes of the launch to check for (default: as launched, or 1)")
    check.add_argument(
        "--nproc-per-node", type=int, help="ranks per node (default: as launched, else the config's torchrun line)"
    )
    check.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: those visible here)")
    probe.add_arguments(add("probe", "linear-probe accuracy of frozen backbones on the config's data"))
    shards.add_arguments(
        commands.add_parser(
            "shards",
            help="pack images into WebDataset shards",
            description=shards.DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    report = commands.add_parser(
        "report",
        help="write the report of a run directory (summary, plots, report.md)",
        description="Write <RUN_DIR>/report/: summary.json, report.md and the plots, "
        "from what the run wrote (any run: federate, run, a compare row).",
    )
    report.add_argument("run_dir", help="a run directory (<run.root>/<run.name>), e.g. runs/fmnist_lt")
    tiny = commands.add_parser(
        "tiny-models", help="build tiny LLaVA and open_clip models in DIR (random, or trained with --train)"
    )
    tiny.add_argument("directory", help="output directory (gets llava/ and clip/)")
    tiny.add_argument(
        "--train",
        metavar="CORPUS",
        default=None,
        help="captioned WebDataset shards (e.g. shards/fmnist_web) to train the stand-ins on; "
        "without it the models are random",
    )
    tiny.add_argument("--seed", type=int, default=0, help="training seed with --train (default 0)")
    return parser
