"""Benchmark: SCAFFOLD with 100,000 clients, its per-client state store spilling to disk (not a test).

``python benchmarks/client_state.py`` runs the synthetic on-demand source with ``--clients`` clients
(default 100,000), ``--per-round`` sampled per round for ``--rounds`` rounds (default 100 x 20: about 2,000
clients touched) under ``torchrun --nproc_per_node 3``, once with FedAvg (no client state) and once with SCAFFOLD
whose store holds ``--memory-mb`` in rank 0's memory and writes the rest to ``<run>/federated/client_state``. It
prints each process's peak RSS for both, the store's files and bytes, and the bound it checks:

    peak RSS of a SCAFFOLD process - the FedAvg process's <= 48 x K x S bytes + 16 MB, and on rank 0 also the
                                      store's memory budget and 200 bytes per client seen (its index)

(the round's K x S state slots: float64 in the all_reduce buffer and the collective's copies, float32 in the
broadcast and the clone the client hooks read; 48 bytes per entry is this script's measurement on CPU/gloo, 38 to
49 bytes at K = 100, S = 78,042, rounded up),
with K clients per round and S trainable parameters: nothing grows with the number of clients N, and the disk
grows with the clients seen (one file per client, two between a version and the next checkpoint).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package, as in the runs it starts
# Each rank prints its own peak RSS when it exits (the summary keeps only the largest).
DRIVER = """
import atexit, os, resource, sys
atexit.register(lambda: print(f"PEAK_RSS rank {os.environ.get('RANK', '0')} "
                              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MB", file=sys.stderr))
from mllmfl_dist.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def run(driver: Path, root: Path, name: str, overrides: list[str]) -> dict[int, float]:
    sets = [
        f"run.root={root}",
        f"run.name={name}",
        "log.progress=false",
        "log.tensorboard=false",
        "dist.threads=1",
        "eval.every=1000",
        "checkpoint.every=5",
        *overrides,
    ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=3",
        str(driver),
        "federate",
        str(REPO / "configs" / "smoke.toml"),
        *[a for s in sets for a in ("--set", s)],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return {int(m[1]): float(m[2]) for m in re.finditer(r"PEAK_RSS rank (\d+) ([\d.]+) MB", done.stderr)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/client_state.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--memory-mb", type=float, default=64.0, help="federated.client_state_mb")
    args = parser.parse_args(argv)
    common = [
        "data.synthetic_mode=on_demand",
        "data.samples_per_client=8",
        "data.image_size=8",
        "partition.method=iid",
        "federated.local_epochs=1",
        "federated.batch_size=8",
        f"federated.num_clients={args.clients}",
        f"federated.clients_per_round={args.per_round}",
        f"federated.rounds={args.rounds}",
        f"federated.client_state_mb={args.memory_mb}",
    ]
    with tempfile.TemporaryDirectory(prefix="mllmfl_client_state_") as tmp:
        root = Path(tmp)
        driver = root / "driver.py"
        driver.write_text(DRIVER)
        print(
            f"# {args.clients:,} clients, {args.per_round} per round, {args.rounds} rounds, 3 processes, "
            f"store budget {args.memory_mb:g} MB",
            flush=True,
        )
        peaks = {
            name: run(driver, root, name, [*common, f"federated.strategy={name}"]) for name in ("fedavg", "scaffold")
        }
        store = root / "scaffold" / "federated" / "client_state"
        files = list(store.iterdir())
        disk = sum(f.stat().st_size for f in files)

        from mllmfl_dist.config import load_config
        from mllmfl_dist.stages.inputs import build_data, build_fl_model

        cfg = load_config(REPO / "configs" / "smoke.toml", [*common, "federated.num_clients=100"])
        model = build_fl_model(cfg.model, build_data(cfg), cfg.run.seed)
        width = sum(p.numel() for p in model.parameters() if p.requires_grad)
        seen = len({f.name.split("-")[0] for f in files})
        slots = 48 * args.per_round * width / 2**20 + 16
        for rank in sorted(peaks["scaffold"]):
            bound = peaks["fedavg"][rank] + slots + (args.memory_mb + 200 * seen / 2**20 if rank == 0 else 0)
            extra = (peaks["scaffold"][rank] - peaks["fedavg"][rank]) * 2**20 / (args.per_round * width)
            print(
                f"rank {rank}: peak RSS fedavg {peaks['fedavg'][rank]:.0f} MB, scaffold "
                f"{peaks['scaffold'][rank]:.0f} MB ({extra:.0f} bytes per state slot entry); bound {bound:.0f} MB: "
                f"{'met' if peaks['scaffold'][rank] <= bound else 'NOT met'}"
            )
        print(
            f"store: {seen:,} clients seen, {len(files):,} files, {disk / 2**20:.1f} MB on disk "
            f"({disk / max(seen, 1) / 1024:.0f} KB per client; state {width:,} float32 per client)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
