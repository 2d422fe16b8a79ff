"""Benchmark: the trainer against a framework-free loop, and 100 against 100,000 clients, in one run.

``python benchmarks/bench.py`` (``launch/bench.sh``) prints ratios measured side by side, because
absolute seconds on shared machines are noise. It is not a test; CI does not run it.

1. ``configs/fmnist_lt.toml`` for 10 rounds under ``torchrun --nproc_per_node 3`` (two client hosts),
   and in the same invocation :func:`reference_rounds` — plain PyTorch in one process with 2 threads,
   training the same sampled clients one after another and averaging them — on the same data.
2. The trainer on the synthetic on-demand source with 100 and with 100,000 clients (10 per round,
   64 samples each): same work per round, only N changes.
3. Cross-device shapes (``benchmarks/cross_device.py``): 1,000 clients, 100 per round, batch 8 and 10,000 clients,
   1,000 per round, batch 4, per-sample against the reference loop at 1 thread halved, with clients one after
   another and vectorized (``federated.vectorize``); vectorized at batch 32; and the compute-bound shape of 1.
   against the commit before vectorized clients (``--baseline``), alternating, median of 3.

``--annotate CONFIG`` instead times stage 1a's captioning at batch size 1 against the configured batch
size on the same images (batching must batch the vision tower and the decoder to pay off).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# A script of the checkout: it measures this checkout's package, and the framework-free reference loop is a
# test helper (tests/reference_loop.py).
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]
from reference_loop import reference_rounds  # noqa: E402
from cross_device import Shape, against_commit, commit_before_vectorizing, cross_device, vectorized_at  # noqa: E402

from mllmfl_dist.config import load_config  # noqa: E402


# -- running the trainer ---------------------------------------------------------------------------
def torchrun(nproc: int, args: Sequence[str], env: dict[str, str] | None = None, repo: Path = REPO) -> float:
    """Run ``torchrun --standalone --nproc_per_node nproc ARGS`` with ``repo``'s package; returns the launch time
    (epoch s)."""
    launched = time.time()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    # OMP_NUM_THREADS set, so torchrun does not print its banner; the trainer's threads are dist.threads.
    env = {"OMP_NUM_THREADS": "1", **os.environ, **(env or {}), "PYTHONPATH": str(repo)}
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return launched


def trainer_run(
    config: Path, root: Path, name: str, overrides: Sequence[str], nproc: int = 3, repo: Path = REPO
) -> dict:
    sets = [
        f"run.root={root}",
        f"run.name={name}",
        "log.progress=false",
        "log.tensorboard=false",
        "eval.every=1000",
        "checkpoint.every=1000",
        *overrides,
    ]
    args = ["-m", "mllmfl_dist", "federate", str(config), *[a for s in sets for a in ("--set", s)]]
    launched = torchrun(nproc, args, repo=repo)
    out = root / name / "federated"
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return {
        "median_round_s": statistics.median(r["seconds"] for r in rounds[1:]),
        "round_seconds": [r["seconds"] for r in rounds],
        "launch_to_round1_s": rounds[0]["end_time"] - launched,
        "bytes_all_reduced": rounds[0]["bytes_all_reduced"],
        "peak_rss_mb": summary["peak_rss_mb_max_rank"],
        "acc": summary["final"]["acc"],
    }


def import_baseline_s(nproc: int) -> float:
    """Wall time of torchrun starting ``nproc`` interpreters that only import torch."""
    started = time.time()
    torchrun(nproc, ["--no-python", sys.executable, "-c", "import torch"])
    return time.time() - started


def bench_annotation(config: str, images: int, overrides: Sequence[str] = ()) -> None:
    """Captioning throughput at batch size 1 against the configured batch size, on the same images."""
    from mllmfl_dist.data.images import decode_image
    from mllmfl_dist.data.shards import expand_shards, iter_samples
    from mllmfl_dist.mllm.llava import load_llava
    from mllmfl_dist.mllm.captioning import Generation, caption_batch

    cfg = load_config(config, overrides)
    torch.set_num_threads(cfg.dist.threads)
    pool = []
    for shard in expand_shards(cfg.annotate.shards):
        pool += [decode_image(s["image_bytes"]).convert("RGB") for s in iter_samples(shard)]
        if len(pool) >= images:
            break
    pool = pool[:images]
    model, processor = load_llava(cfg.annotate.model, dtype=cfg.annotate.dtype)
    generation = Generation.from_config(cfg.annotate)
    caption_batch(model, processor, pool[:2], generation)  # warm-up
    rates = {}
    for batch_size in (1, cfg.annotate.batch_size):
        started = time.perf_counter()
        for start in range(0, len(pool), batch_size):
            caption_batch(model, processor, pool[start : start + batch_size], generation)
        rates[batch_size] = len(pool) / (time.perf_counter() - started)
        print(
            f"batch {batch_size:>3}: {rates[batch_size]:.1f} images/s ({len(pool)} images, "
            f"{cfg.dist.threads} thread(s), max_new_tokens {generation.max_new_tokens})",
            flush=True,
        )
    ratio = rates[cfg.annotate.batch_size] / rates[1]
    print(
        f"ratio batch {cfg.annotate.batch_size} / batch 1: {ratio:.2f}x  (target >= 3x: "
        f"{'met' if ratio >= 3 else 'NOT met'})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "configs" / "fmnist_lt.toml"))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--synthetic-config", default=str(REPO / "configs" / "smoke.toml"))
    parser.add_argument(
        "--annotate", metavar="CONFIG", help="instead: captioning images/s at batch 1 against [annotate] batch_size"
    )
    parser.add_argument("--images", type=int, default=64, help="images for --annotate")
    parser.add_argument("--cross-rounds", type=int, default=6, help="rounds of each cross-device run")
    parser.add_argument(
        "--baseline", help="commit to time the compute-bound shape against (default: the one before vectorized clients)"
    )
    parser.add_argument("--only-cross-device", action="store_true", help="run part 3 alone")
    parser.add_argument("--nproc", type=int, default=3, help="processes of part 3's trainer runs (1 on a one-GPU node)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="config override for --annotate; repeatable",
    )
    args = parser.parse_args(argv)
    if args.annotate:
        bench_annotation(args.annotate, args.images, args.overrides)
        return 0

    with tempfile.TemporaryDirectory(prefix="mllmfl_bench_") as tmp:
        root = Path(tmp)
        if not args.only_cross_device:
            bench_workload_and_scale(args, root)
        run = functools.partial(trainer_run, nproc=args.nproc)
        print(
            f"# cross-device shapes on {args.config}, {args.cross_rounds} rounds each, {args.nproc} processes",
            flush=True,
        )
        for shape in (Shape(1_000, 100, 8, 25), Shape(10_000, 1_000, 4, 50)):
            cross_device(Path(args.config), root, shape, args.cross_rounds, run)
        vectorized_at(Path(args.config), root, args.rounds, 5, run)
        baseline = args.baseline or commit_before_vectorizing(REPO)
        against_commit(Path(args.config), root, REPO, baseline, args.rounds, run)
    return 0


def bench_workload_and_scale(args: argparse.Namespace, root: Path) -> None:
    """Parts 1 and 2 of the module docstring."""
    print(f"# fmnist_lt workload, {args.rounds} rounds ({args.config})", flush=True)
    baseline = import_baseline_s(3)
    trainer = trainer_run(Path(args.config), root, "trainer", [f"federated.rounds={args.rounds}"])
    loop_median = {}
    for channels_last in (False, True):
        cfg = load_config(
            args.config, [f"federated.rounds={args.rounds}", f"model.channels_last={str(channels_last).lower()}"]
        )
        _, loop_seconds = reference_rounds(cfg, args.rounds, threads=2)
        loop_median[channels_last] = statistics.median(loop_seconds[1:])
    ratio = trainer["median_round_s"] / loop_median[False]
    startup = trainer["launch_to_round1_s"] - baseline
    trainer_cfg = load_config(args.config, [f"federated.rounds={args.rounds}"])
    print(
        f"trainer (torchrun, 3 processes, {trainer_cfg.dist.threads} thread each, channels_last "
        f"{trainer_cfg.model.channels_last}): median round {trainer['median_round_s']:.3f} s "
        f"(rounds 2-{args.rounds})"
    )
    print(f"framework-free loop (1 process, 2 threads, plain NCHW): median round {loop_median[False]:.3f} s")
    print(f"ratio trainer / loop: {ratio:.3f}  (target <= 0.85: {'met' if ratio <= 0.85 else 'NOT met'})")
    print(
        f"  for reference, the loop with channels_last too: median round {loop_median[True]:.3f} s; "
        f"ratio {trainer['median_round_s'] / loop_median[True]:.3f} (process parallelism alone)"
    )
    print(
        f"launch to end of round 1: {trainer['launch_to_round1_s']:.2f} s; torchrun + 3x import torch: "
        f"{baseline:.2f} s; beyond that: {startup:.2f} s  "
        f"(target <= 5 s: {'met' if startup <= 5 else 'NOT met'})"
    )
    print(f"bytes all-reduced per round: {trainer['bytes_all_reduced']:,}")
    print(f"peak memory (max over ranks): {trainer['peak_rss_mb']:.0f} MB")

    print("# synthetic on-demand source, 10 clients per round, 64 samples each", flush=True)
    scale = {}
    for n in (100, 100_000):
        scale[n] = trainer_run(
            Path(args.synthetic_config),
            root,
            f"clients_{n}",
            [
                "data.synthetic_mode=on_demand",
                "data.samples_per_client=64",
                "partition.method=iid",
                f"federated.num_clients={n}",
                "federated.clients_per_round=10",
                f"federated.rounds={args.rounds}",
            ],
        )
        print(
            f"N = {n:>7,}: median round {scale[n]['median_round_s']:.3f} s, "
            f"peak memory {scale[n]['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    time_ratio = scale[100_000]["median_round_s"] / scale[100]["median_round_s"]
    memory_delta = scale[100_000]["peak_rss_mb"] - scale[100]["peak_rss_mb"]
    print(
        f"round time ratio N=100,000 / N=100: {time_ratio:.3f}  (target <= 1.1: "
        f"{'met' if time_ratio <= 1.1 else 'NOT met'})"
    )
    print(
        f"extra memory per process at N=100,000: {memory_delta:+.1f} MB  (target <= 50 MB: "
        f"{'met' if memory_delta <= 50 else 'NOT met'})"
    )


if __name__ == "__main__":
    sys.exit(main())
