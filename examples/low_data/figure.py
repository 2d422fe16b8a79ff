"""The low-data claim, over seeds, from the compares of ``examples/low_data/sweep.sh``.

``python examples/low_data/figure.py [--runs runs] [--prefix fmnist_lt_lowdata] [--target 0.5] [--early 10]
[--out docs/figures/low_data.png]`` reads ``<runs>/<prefix>-f<fraction>/compare/<row>/seed<seed>/federated/``
for the four rows (FedAvg from scratch and from the DWP backbone, each without and with LLaVA alignment) and
prints, per fraction of the clients' data:

- per row: the balanced test accuracy at round ``--early`` (a third of the 30 rounds, where a head start
  shows if it is there; fixed when only seed 0 at 10% had run), at the final round and as the mean of the last 3
  evaluations, each as mean +- standard deviation [95% Student-t interval] over the seeds
  (``mllmfl_dist.commands.seed_statistics``); the validation split's last-3 mean; the first evaluated round
  at or above ``--target`` per seed (``-`` for never);
- DWP minus scratch, paired seed by seed, without alignment and with it, at the same points.

It plots accuracy per round (mean over seeds, 95% interval as a band), one panel per fraction. A row with no
finished seed is left out and counted.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from mllmfl_dist.commands.seed_statistics import (
    Spread,
    first_round_reaching,
    interval_text,
    last_mean,
    paired_difference,
    spread,
)

LAST = 3
ROWS = {  # compare's row folder -> the label printed and plotted
    "fedavg": "FedAvg, scratch",
    "fedavg+dwp-llava": "FedAvg, DWP",
    "fedavg+align-llava": "+ llava alignment, scratch",
    "mllm-llava-fl": "+ llava alignment, DWP (mllm-llava-fl)",
}
PAIRS = {  # what a paired difference isolates: DWP's backbone against a random one, alignment off and on
    "DWP minus scratch, no alignment": ("fedavg+dwp-llava", "fedavg"),
    "DWP minus scratch, llava alignment": ("mllm-llava-fl", "fedavg+align-llava"),
}


def read_fraction(compare: Path) -> tuple[dict[str, dict[int, list[dict]]], int]:
    """``{row: {seed: evaluation records}}`` of the finished runs under one compare folder, and how many
    started runs have not finished."""
    found: dict[str, dict[int, list[dict]]] = {}
    unfinished = 0
    for row in ROWS:
        for seed_dir in sorted((compare / row).glob("seed*")):
            match = re.fullmatch(r"seed(\d+)", seed_dir.name)
            if not match:
                continue
            federated = seed_dir / "federated"
            if not (federated / "summary.json").is_file():
                unfinished += 1
                continue
            lines = (federated / "metrics.jsonl").read_text().splitlines()
            found.setdefault(row, {})[int(match.group(1))] = [json.loads(line) for line in lines if line.strip()]
    return found, unfinished


def at_round(evaluations: list[dict], rnd: int) -> float | None:
    """Test accuracy of the evaluation at round ``rnd``; None when the run did not evaluate there."""
    return next((e["acc"] for e in evaluations if e.get("round") == rnd), None)


def diff_cell(s: Spread) -> str:
    if s.mean is None:
        return "-"
    if s.ci95 is None:
        return f"{s.mean:+.3f}"
    return f"{s.mean:+.3f} [{s.mean - s.ci95:+.3f}, {s.mean + s.ci95:+.3f}]"


def per_seed(runs: dict[int, list[dict]], measure) -> dict[int, float]:
    values = {seed: measure(evaluations) for seed, evaluations in runs.items()}
    return {seed: v for seed, v in values.items() if v is not None}


def report(fraction: str, found: dict[str, dict[int, list[dict]]], target: float, early: int) -> None:
    measures = {
        f"round {early}": lambda e: at_round(e, early),
        "final": lambda e: e[-1]["acc"],
        f"last {LAST}": lambda e: last_mean(e, "acc", LAST),
    }
    print(f"\n### clients hold {float(fraction):.0%} of the training set\n")
    print(f"| row | seeds | {' | '.join(measures)} | val, last {LAST} | first round >= {target} |")
    print("|---|---|" + "---|" * len(measures) + "---|---|")
    for row, label in ROWS.items():
        runs = found.get(row, {})
        if not runs:
            continue
        cells = [interval_text(spread(list(per_seed(runs, m).values()))) for m in measures.values()]
        val = interval_text(spread(list(per_seed(runs, lambda e: last_mean(e, "val_acc", LAST)).values())))
        reached = [first_round_reaching(runs[s], target) for s in sorted(runs)]
        rounds = ", ".join("-" if r is None else str(r) for r in reached)
        print(f"| {label} | {','.join(map(str, sorted(runs)))} | {' | '.join(cells)} | {val} | {rounds} |")
    print(f"\n| paired, seed by seed | {' | '.join(measures)} |")
    print("|---|" + "---|" * len(measures))
    for name, (row, base) in PAIRS.items():
        if row not in found or base not in found:
            continue
        cells = [
            diff_cell(paired_difference(per_seed(found[row], m), per_seed(found[base], m))) for m in measures.values()
        ]
        print(f"| {name} | {' | '.join(cells)} |")


def plot(fractions: dict[str, dict[str, dict[int, list[dict]]]], target: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(fractions), figsize=(4.2 * len(fractions), 3.6), sharey=True, squeeze=False)
    for ax, (fraction, found) in zip(axes[0], fractions.items(), strict=True):
        for row, label in ROWS.items():
            runs = found.get(row, {})
            if not runs:
                continue
            rounds = sorted({e["round"] for evaluations in runs.values() for e in evaluations})
            stats = [spread(list(per_seed(runs, lambda e, r=r: at_round(e, r)).values())) for r in rounds]
            mean = [s.mean for s in stats]
            half = [s.ci95 or 0.0 for s in stats]
            line = ax.plot(rounds, mean, label=label)[0]
            ax.fill_between(
                rounds, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)],
                color=line.get_color(), alpha=0.15,
            )  # fmt: skip
        ax.axhline(target, color="gray", linestyle=":", linewidth=1)
        seeds = sorted({len(runs) for runs in found.values()})
        ax.set_title(f"clients hold {float(fraction):.0%} of the data ({'-'.join(map(str, seeds))} seeds)", fontsize=9)
        ax.set_xlabel("round")
    axes[0][0].set_ylabel("balanced test accuracy (mean, 95% CI)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(ROWS), fontsize=8, frameon=False)
    fig.suptitle("Fashion-MNIST-LT, 100 clients, 10 per round: DWP against scratch", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"\nfigure: {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--prefix", default="fmnist_lt_lowdata")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--early", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("docs/figures/low_data.png"))
    args = parser.parse_args(argv)
    pattern = re.compile(rf"^{re.escape(args.prefix)}-f([0-9.]+)$")
    fractions: dict[str, dict[str, dict[int, list[dict]]]] = {}
    unfinished = 0
    folders = sorted(args.runs.iterdir()) if args.runs.is_dir() else []
    for folder in sorted(folders, key=lambda p: float(m.group(1)) if (m := pattern.match(p.name)) else 0.0):
        match = pattern.match(folder.name)
        if not match:
            continue
        found, missing = read_fraction(folder / "compare")
        unfinished += missing
        if found:
            fractions[match.group(1)] = found
    if not fractions:
        print(f"no finished runs {args.runs}/{args.prefix}-f*/compare; run examples/low_data/sweep.sh", file=sys.stderr)
        return 2
    for fraction, found in fractions.items():
        report(fraction, found, args.target, args.early)
    if unfinished:
        print(f"\n({unfinished} run(s) not finished, left out)")
    plot(fractions, args.target, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
