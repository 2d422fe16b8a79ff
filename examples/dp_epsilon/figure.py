"""DP-FedAvg's accuracy against epsilon, over seeds, from the runs of ``examples/dp_epsilon/sweep.sh``.

``python examples/dp_epsilon/figure.py [--runs runs] [--prefix fmnist_dp] [--out docs/figures/dp_epsilon.png]``
reads ``<runs>/<prefix>-z<z>-s<seed>/federated/`` (``z`` a noise multiplier, or ``none`` for the same runs without
DP), prints one row per noise multiplier — epsilon at the config's delta after the last round, and the balanced
test accuracy at the last round and as the mean of the last 3 evaluations, each as mean, standard deviation and
95% Student-t confidence interval over the seeds (``mllmfl_dist.commands.seed_statistics``), with the balanced
validation accuracy beside it — and plots the final accuracy (mean, 95% CI bars) against epsilon, the runs without
DP as a band. A run that has not finished is left out and counted.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from mllmfl_dist.commands.seed_statistics import interval_text, last_mean, spread

LAST = 3  # evaluations averaged for the "last 3" column (eval.every = 5: rounds 90, 95, 100)


def read_runs(runs: Path, prefix: str) -> tuple[dict[str, list[dict]], int]:
    """``{z: [one record per finished seed]}`` and the number of unfinished runs."""
    pattern = re.compile(rf"^{re.escape(prefix)}-z(none|[0-9.]+)-s(\d+)$")
    found: dict[str, list[dict]] = {}
    unfinished = 0
    for run in sorted(runs.iterdir()):
        match = pattern.match(run.name)
        if not match:
            continue
        summary = run / "federated" / "summary.json"
        if not summary.is_file():
            unfinished += 1
            continue
        final = json.loads(summary.read_text())["final"]
        evaluations = [json.loads(line) for line in (run / "federated" / "metrics.jsonl").read_text().splitlines()]
        found.setdefault(match.group(1), []).append(
            {
                "seed": int(match.group(2)),
                "acc": final["acc"],
                "val_acc": final["val_acc"],
                "last": last_mean(evaluations, "acc", LAST),
                "epsilon": evaluations[-1].get("dp_epsilon"),
            }
        )
    return found, unfinished


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--prefix", default="fmnist_dp")
    parser.add_argument("--out", type=Path, default=Path("docs/figures/dp_epsilon.png"))
    args = parser.parse_args(argv)
    found, unfinished = read_runs(args.runs, args.prefix)
    if not found:
        print(f"no finished runs {args.runs}/{args.prefix}-z*-s*; run examples/dp_epsilon/sweep.sh", file=sys.stderr)
        return 2
    order = sorted(found, key=lambda z: float("inf") if z == "none" else -float(z))
    print("| noise multiplier z | epsilon (delta 1e-5) | seeds | test balanced acc, round 100 | last 3 evals | val |")
    print("|---|---|---|---|---|---|")
    points = []
    for z in order:
        rows = found[z]
        eps = [r["epsilon"] for r in rows if r["epsilon"] is not None]
        acc = spread([r["acc"] for r in rows])
        last = spread([r["last"] for r in rows if r["last"] is not None])
        val = spread([r["val_acc"] for r in rows])
        eps_text = "inf (no DP)" if z == "none" else f"{max(eps):.2f}" if eps else "-"
        seeds = ",".join(str(r["seed"]) for r in sorted(rows, key=lambda r: r["seed"]))
        print(f"| {z} | {eps_text} | {seeds} | {interval_text(acc)} | {interval_text(last)} | {interval_text(val)} |")
        points.append((z, max(eps) if eps else None, acc))
    if unfinished:
        print(f"({unfinished} run(s) not finished, left out)")

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    dp = [(e, a) for z, e, a in points if z != "none" and e is not None and a.mean is not None]
    ax.errorbar(
        [e for e, _ in dp],
        [a.mean for _, a in dp],
        yerr=[a.ci95 or 0.0 for _, a in dp],
        marker="o",
        capsize=3,
        label="DP-FedAvg (mean, 95% CI)",
    )
    for z, _, a in points:
        if z == "none" and a.mean is not None:
            ax.axhline(a.mean, color="gray", linestyle="--", label="FedAvg without DP")
            if a.ci95:
                ax.axhspan(a.mean - a.ci95, a.mean + a.ci95, color="gray", alpha=0.2)
    if dp:  # a log axis needs points; without DP rows the figure holds the band alone
        ax.set_xscale("log")
        ax.set_xticks([e for e, _ in dp])
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("epsilon after 100 rounds (delta = 1e-5)")
    ax.set_ylabel("balanced test accuracy")
    ax.set_title("DP-FedAvg on Fashion-MNIST-LT\n1,000 clients, 100 per round, 100 rounds", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"figure: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
