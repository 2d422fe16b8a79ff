"""The report's PNG plots (matplotlib, Agg), written atomically.

One colour per series everywhere (:data:`COLOURS`): the method after alignment (or without alignment) is
blue, before alignment orange, the FedAvg-from-scratch baseline grey, chance a dotted black line. Rounds
are integer ticks; per-class axes carry the class names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mllmfl_dist.core.checkpoint import savefig_atomic

COLOURS = {"method": "tab:blue", "before": "tab:orange", "baseline": "tab:gray", "chance": "black"}
GROUPS = (("Many", "acc_many"), ("Medium", "acc_medium"), ("Few", "acc_few"))


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def num(x: Any) -> float:
    """A plottable float: None / non-numbers become NaN (matplotlib leaves a gap)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return math.nan
    return float(x)


def _save(fig, path: Path) -> None:
    savefig_atomic(fig, path, dpi=100, bbox_inches="tight")
    pyplot().close(fig)


def save_accuracy_plot(
    fig, ax, path: Path, title: str = "Balanced accuracy over rounds", chance: float | None = None
) -> None:
    """Label an accuracy-over-rounds axes (integer round ticks, a chance line when given), write the figure
    atomically and close it."""
    from matplotlib.ticker import MaxNLocator

    if chance is not None:
        ax.axhline(chance, color=COLOURS["chance"], linestyle=":", linewidth=1, label=f"chance ({chance:.3f})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_xlabel("round")
    ax.set_ylabel("balanced test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title)
    _save(fig, path)


def accuracy_plot(path: Path, records: list[dict], baseline: list[dict], chance: float | None, method: str) -> None:
    """Balanced accuracy over rounds: the method (after alignment, and before it where recorded), the
    FedAvg-from-scratch baseline when there is one, and chance."""
    fig, ax = pyplot().subplots(figsize=(6.5, 4))
    aligned = any(isinstance(r.get("before_align"), dict) for r in records)
    rounds = [r.get("round", i) for i, r in enumerate(records)]
    ax.plot(
        rounds,
        [num(r.get("acc")) for r in records],
        marker="o",
        color=COLOURS["method"],
        label=f"{method}, after alignment" if aligned else method,
    )
    if aligned:
        ax.plot(
            rounds,
            [num((r.get("before_align") or {}).get("acc")) for r in records],
            marker="s",
            linestyle="--",
            color=COLOURS["before"],
            label=f"{method}, before alignment",
        )
    if baseline:
        ax.plot(
            [r.get("round") for r in baseline],
            [num(r.get("acc")) for r in baseline],
            marker="^",
            color=COLOURS["baseline"],
            label="FedAvg from scratch (same data and seed)",
        )
    save_accuracy_plot(fig, ax, path, chance=chance)


def per_class_plot(path: Path, last: dict, class_names: Sequence[str], baseline_last: dict | None) -> None:
    """Final per-class accuracy, named classes on the axis: before / after alignment and the baseline."""
    per_class = last.get("per_class") or []
    aligned = last.get("before_align") if isinstance(last.get("before_align"), dict) else {}
    before = aligned.get("per_class") or []
    base = (baseline_last or {}).get("per_class") or []
    n = max(len(per_class), len(before), len(base))
    series = [
        (label, values, COLOURS[key])
        for label, values, key in (
            ("FedAvg from scratch", base, "baseline"),
            ("before alignment", before, "before"),
            ("after alignment" if before else "method", per_class, "method"),
        )
        if values
    ]
    fig, ax = pyplot().subplots(figsize=(max(6.0, 0.45 * n + 2), 4.2))
    if n:
        width = 0.8 / len(series)
        for j, (label, values, colour) in enumerate(series):
            offset = (j - (len(series) - 1) / 2) * width
            padded = [num(v) for v in values] + [math.nan] * (n - len(values))
            ax.bar([i + offset for i in range(n)], padded, width=width, color=colour, label=label)
        step = max(1, n // 40)  # keep labels readable for 100 / 1000 classes
        names = list(class_names) if len(class_names) == n else [str(i) for i in range(n)]
        ax.set_xticks(list(range(n))[::step])
        ax.set_xticklabels(names[::step], rotation=45 if n <= 20 else 90, ha="right" if n <= 20 else "center")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no per-class accuracy recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("test accuracy of the class")
    ax.set_ylim(0, 1)
    ax.set_title(f"Per-class accuracy, round {last.get('round')}")
    _save(fig, path)


def groups_plot(path: Path, last: dict, baseline_last: dict | None) -> None:
    """Final Many / Medium / Few accuracy; a group without classes is marked absent."""
    before = last.get("before_align") if isinstance(last.get("before_align"), dict) else None
    series = [
        (label, source, COLOURS[key])
        for label, source, key in (
            ("FedAvg from scratch", baseline_last, "baseline"),
            ("before alignment", before, "before"),
            ("after alignment" if before else "method", last, "method"),
        )
        if source
    ]
    fig, ax = pyplot().subplots(figsize=(5.5, 4))
    width = 0.8 / len(series)
    for j, (label, source, colour) in enumerate(series):
        offsets = [i + (j - (len(series) - 1) / 2) * width for i in range(len(GROUPS))]
        values = [num(source.get(key)) for _, key in GROUPS]
        ax.bar(offsets, values, width=width, color=colour, label=label)
        for x, v in zip(offsets, values):
            ax.text(
                x,
                0.02 if math.isnan(v) else v + 0.01,
                "absent" if math.isnan(v) else f"{v:.2f}",
                ha="center",
                va="bottom",
                fontsize=8,
                rotation=90 if math.isnan(v) else 0,
            )
    ax.set_xticks(list(range(len(GROUPS))))
    ax.set_xticklabels([g for g, _ in GROUPS])
    ax.set_ylabel("mean test accuracy of the group's classes")
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=8)
    ax.set_title(f"Many / Medium / Few, round {last.get('round')}")
    _save(fig, path)


def partition_plot(path: Path, counts: Sequence[Sequence[int]], class_names: Sequence[str]) -> None:
    """The partition as a heatmap: training samples of each class (columns) on each client (rows)."""
    plt = pyplot()
    clients, classes = len(counts), len(counts[0]) if counts else 0
    fig, ax = plt.subplots(figsize=(max(5.0, 0.4 * classes + 2), max(3.0, min(12.0, 0.12 * clients + 2))))
    image = ax.imshow(counts, aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(image, ax=ax, label="training samples")
    names = list(class_names) if len(class_names) == classes else [str(c) for c in range(classes)]
    step = max(1, classes // 40)
    ax.set_xticks(list(range(classes))[::step])
    ax.set_xticklabels(names[::step], rotation=45 if classes <= 20 else 90, ha="right" if classes <= 20 else "center")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # clients are whole numbers
    ax.set_ylabel("client")
    ax.set_title(f"Partition: samples per class on each of {clients} clients")
    _save(fig, path)
