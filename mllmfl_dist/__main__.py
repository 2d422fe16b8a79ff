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
from mllmfl_dist.core.launch import env_rank, first_to_report
from mllmfl_dist.core.preflight import interrupted_message
from mllmfl_dist.core.progress import quiet_library_bars

USAGE_ERROR = 2  # a config, data or model the user can fix
DIVERGED = 3  # training went non-finite; the last checkpoint is kept
RANK_LOST = 4  # a wait on another rank ran out or broke (stopped, hung or killed rank)
INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command ended by Ctrl-C


def _setup_logging() -> None:
    rank = env_rank()
    # A time on every line: in a SLURM or nohup log it is the only clock there is.
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        datefmt="%Y-%m-%d %H:%M:%S",
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    quiet_library_bars(rank)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stop = preempt.StopRequest()
    if args.command in ("run", "annotate", "pretrain", "federate", "compare"):
        stop.install()  # first: a stop request must not kill the process (its default action)
    _setup_logging()
    # Each command's module is imported when it runs, not above: `--help`, argument errors and `check` must not
    # wait for torch (seconds), and `check` must not import transformers or DeepSpeed.
    try:
        if args.command == "shards":
            from mllmfl_dist.commands import shards

            return shards.run(args)
        if args.command == "report":
            from mllmfl_dist.commands import report

            return report.run(args.run_dir)
        if args.command == "tiny-models":
            from mllmfl_dist.commands import tiny_models

            return tiny_models.run(args)
        # Only the commands that write a run directory need one that can be made (evaluate and probe read it;
        # check reports it in its table).
        cfg = load_config(args.config, args.overrides, check_run_dir=args.command not in ("evaluate", "probe", "check"))
        if args.command in ("check", "run"):
            from mllmfl_dist.commands import check

            if args.command == "check":
                return check.run_check(
                    cfg, args.config, args.for_command, args.nnodes, args.nproc_per_node, args.gpus_per_node
                )
            check.refuse_missing(cfg, "run")  # before any process group or file: one line per missing thing
        from mllmfl_dist.tracking.tracker import check_trackers  # imports torch: after check has answered

        check_trackers(cfg.log)
        if args.command == "evaluate":
            from mllmfl_dist.commands import evaluate

            return evaluate.run(cfg, args.checkpoint)
        if args.command == "probe":
            from mllmfl_dist.commands.probe import run_probe
            from mllmfl_dist.commands.seed_statistics import parse_seed_list

            seeds = parse_seed_list(args.seeds) if args.seeds is not None else None
            run_probe(cfg, args.backbones, args.train_set, args.out, seeds)
            return 0
        from mllmfl_dist.commands import distributed

        return distributed.run(cfg, args, stop)
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
        what = f"{args.command} {getattr(args, 'config', None) or getattr(args, 'run_dir', '')}".strip()
        return _fail(Exception(interrupted_message(what)), INTERRUPTED, everywhere=False, label="")


def _fail(err: Exception, code: int, *, everywhere: bool, prefix: str = "", label: str = "error: ") -> int:
    """One line on stderr, and the same message in torchelastic's error file so torchrun's failure block
    carries it. An outcome every rank meets alike (config, data, a diverged round, a preemption stop) is
    printed by one process per node (the first there to meet it: a problem of one node's files still shows,
    and a node prints it once); a lost rank is reported by every rank that saw it."""
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


if __name__ == "__main__":
    sys.exit(main())
