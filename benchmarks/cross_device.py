"""The benchmark's cross-device part (``benchmarks/bench.py`` runs it; not a test): many small clients per round.

For each shape (clients, per round, batch size) on ``configs/fmnist_lt.toml`` it runs, in one invocation:

- the reference loop (``tests/reference_loop.py``: plain PyTorch, one process, **1 thread**), whose per-sample time
  halved is the two-process compute limit of a 2-core machine;
- the trainer under ``torchrun --nproc_per_node 3`` (two client hosts), clients one after another;
- the same with vectorized clients (``federated.vectorize = K``),

and prints per-sample seconds (rounds 2..R, the samples of the sampled clients), each trainer's ratio to the
limit, vectorized against sequential, and the peak memory of the largest process. :func:`against_commit` times
the compute-bound shape against another commit's trainer, alternating runs, median of 3.
"""

from __future__ import annotations

import statistics
import subprocess
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from reference_loop import reference_rounds

from mllmfl_dist.config import load_config
from mllmfl_dist.fl.sampling import sample_clients
from mllmfl_dist.stages.inputs import build_data

TrainerRun = Callable[..., dict]


@dataclass(frozen=True)
class Shape:
    clients: int
    per_round: int
    batch_size: int
    vectorize: int  # K for the vectorized run: clients_per_round / (2 hosts x a few groups each)

    def overrides(self, rounds: int) -> list[str]:
        return [
            f"federated.num_clients={self.clients}",
            f"federated.clients_per_round={self.per_round}",
            f"federated.batch_size={self.batch_size}",
            f"federated.rounds={rounds}",
        ]

    def __str__(self) -> str:
        return f"{self.clients:,} clients, {self.per_round:,} per round, batch {self.batch_size}"


def per_sample(seconds: list[float], samples: list[int]) -> float:
    """Seconds per training sample over rounds 2.. (round 1 carries start-up)."""
    return sum(seconds[1:]) / sum(samples[1:])


def cross_device(config: Path, root: Path, shape: Shape, rounds: int, trainer_run: TrainerRun) -> dict[str, float]:
    """One shape: the limit, the trainer sequential and vectorized; prints and returns the ratios."""
    overrides = shape.overrides(rounds)
    cfg = load_config(config, overrides)
    data = build_data(cfg)
    fed = cfg.federated
    samples = [
        sum(data.client_size(c) for c in sample_clients(cfg.run.seed, r, fed.num_clients, fed.clients_per_round))
        for r in range(1, rounds + 1)
    ]
    _, loop_seconds = reference_rounds(cfg, rounds, threads=1)
    limit = per_sample(loop_seconds, samples) / 2
    name = f"c{shape.clients}_b{shape.batch_size}"
    seq = trainer_run(config, root, f"{name}_seq", overrides)
    vec = trainer_run(config, root, f"{name}_vec", [*overrides, f"federated.vectorize={shape.vectorize}"])
    seq_s, vec_s = per_sample(seq["round_seconds"], samples), per_sample(vec["round_seconds"], samples)
    out = {"limit": limit, "seq": seq_s / limit, "vec": vec_s / limit, "vec_over_seq": vec_s / seq_s}
    print(
        f"{shape} ({statistics.mean(samples[1:]):.0f} samples per round):\n"
        f"  limit (reference loop at 1 thread, halved): {limit * 1e3:.3f} ms/sample\n"
        f"  sequential clients: {seq_s * 1e3:.3f} ms/sample = {out['seq']:.2f}x the limit  (target <= 1.10: "
        f"{'met' if out['seq'] <= 1.10 else 'NOT met'}); peak memory {seq['peak_rss_mb']:.0f} MB per process\n"
        f"  vectorized clients (K = {shape.vectorize}): {vec_s * 1e3:.3f} ms/sample = {out['vec']:.2f}x the limit "
        f"(target < 1.0: {'met' if out['vec'] < 1.0 else 'NOT met'}), {out['vec_over_seq']:.2f}x sequential; "
        f"peak memory {vec['peak_rss_mb']:.0f} MB per process",
        flush=True,
    )
    return out


def vectorized_at(config: Path, root: Path, rounds: int, vectorize: int, trainer_run: TrainerRun) -> float:
    """The compute-bound shape as configured (batch 32): vectorized over sequential median round time."""
    base = [f"federated.rounds={rounds}"]
    seq = trainer_run(config, root, "b32_seq", base)
    vec = trainer_run(config, root, "b32_vec", [*base, f"federated.vectorize={vectorize}"])
    ratio = vec["median_round_s"] / seq["median_round_s"]
    print(
        f"compute-bound shape (as configured, batch 32): vectorized (K = {vectorize}) / sequential median round "
        f"{vec['median_round_s']:.3f} / {seq['median_round_s']:.3f} s = {ratio:.2f}x",
        flush=True,
    )
    return ratio


def commit_before_vectorizing(repo: Path) -> str:
    """The commit before the one that added vectorized clients (fl/vectorized.py)."""
    added = subprocess.run(
        ["git", "log", "--format=%H", "--diff-filter=A", "-n1", "--", "mllmfl_dist/fl/vectorized.py"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not added:
        raise RuntimeError("no commit adds mllmfl_dist/fl/vectorized.py; pass --baseline REV")
    return f"{added}^"


STAGE1_TABLES = ("annotate", "pretrain")


def federate_only_config(config: Path, out: Path) -> Path:
    """``config`` without its stage-1 tables (``[annotate]``, ``[pretrain]`` and its subtables), written to
    ``out``: everything ``federate`` reads, without stage 1's keys, which an older commit's schema may not know
    (``pretrain.global_batch_size`` was refused there as unknown). A key added since to a table ``federate``
    reads still reaches the older commit, and is refused there: the two would not run the same config.
    ValueError when the line filter would change anything else (multi-line strings or arrays)."""
    source = config.read_text()
    kept, skipping = [], False
    for line in source.splitlines(keepends=True):
        header = line.split("#")[0].strip()
        if header.startswith("[") and header.endswith("]") and "=" not in header:
            first = header.strip("[]").split(".")[0].strip().strip("\"'")
            skipping = first in STAGE1_TABLES
        if not skipping:
            kept.append(line)
    text = "".join(kept)
    # Line filtering misreads multi-line strings and arrays; refuse rather than time a different config.
    want = {k: v for k, v in tomllib.loads(source).items() if k not in STAGE1_TABLES}
    try:
        got = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{config}: could not drop its stage-1 tables line by line ({err})") from err
    if got != want:
        raise ValueError(f"{config}: dropping its stage-1 tables line by line changed other tables")
    out.write_text(text)
    return out


def against_commit(
    config: Path, root: Path, repo: Path, revision: str, rounds: int, trainer_run: TrainerRun, repeats: int = 3
) -> float:
    """The compute-bound shape with this checkout's trainer and with ``revision``'s (a detached worktree) on
    one config without stage 1 (:func:`federate_only_config`), alternating, ``repeats`` runs each; prints and
    returns the ratio of the medians (this / that)."""
    worktree = root / "baseline_checkout"
    config = federate_only_config(config, root / "compute_bound.toml")  # the same file for both checkouts
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(worktree), revision], cwd=repo, check=True, capture_output=True
    )
    try:
        times: dict[str, list[float]] = {"this": [], "that": []}
        for i in range(repeats):
            for which, checkout in (("that", worktree), ("this", repo)):
                result = trainer_run(config, root, f"{which}{i}", [f"federated.rounds={rounds}"], repo=checkout)
                times[which].append(result["median_round_s"])
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=repo, capture_output=True)
    this, that = statistics.median(times["this"]), statistics.median(times["that"])
    print(
        f"compute-bound shape, this checkout against {revision}: median round {this:.3f} s vs {that:.3f} s "
        f"(median of {repeats} runs each, alternating) = {this / that:.3f}x  (target <= 1.0 to noise: "
        f"{'met' if this / that <= 1.03 else 'NOT met'})",
        flush=True,
    )
    return this / that
