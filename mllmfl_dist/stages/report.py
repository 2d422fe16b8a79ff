"""Stage report: final metrics of every stage of a run, and PNG plots.

Pure file-in / file-out (no torch, no torch.distributed); the caller runs it on rank 0.

Reads, when present,
  <run>/annotate/manifest.json   -> summary["annotate"]
  <run>/pretrain/metrics.json    -> summary["pretrain"]
  <run>/federated/metrics.jsonl  -> summary["federated"] (last evaluation)
  <run>/federated/summary.json   -> summary["federated"]["rounds" / "world_size"]
and writes
  <run>/report/summary.json
  <run>/report/accuracy.png   accuracy over rounds (and before alignment, when recorded)
  <run>/report/per_class.png  final per-class accuracy (before / after alignment side by side)
  <run>/report/groups.png     final Many / Medium / Few accuracy (a group that is null is marked absent)
Stages that are absent are left out; without federated metrics no plots are drawn.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from mllmfl_dist.checkpoint import remove_stale_temps, savefig_atomic, write_text_atomic

log = logging.getLogger(__name__)

ACC_KEYS = ("acc", "acc_top1", "acc_many", "acc_medium", "acc_few")
GROUPS = (("Many", "acc_many"), ("Medium", "acc_medium"), ("Few", "acc_few"))
PLOTS = ("accuracy.png", "per_class.png", "groups.png")


def _read_json(path: Path) -> dict | None:
    """The object in `path`, or None (with a warning) when it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("report: cannot read %s: %s", path, e)
        return None
    return obj if isinstance(obj, dict) else None


def read_evaluations(path: Path) -> list[dict]:
    """Evaluation records, in round order, a torn or malformed line dropped, a redone round's last
    record kept."""
    if not path.is_file():
        return []
    by_round: dict[Any, dict] = {}
    order: list[Any] = []
    try:
        lines = path.read_text(errors="replace").splitlines()  # a garbled line is dropped below
    except OSError as e:
        log.warning("report: cannot read %s: %s", path, e)
        return []
    for i, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            log.warning("report: dropping malformed line %d of %s", i + 1, path)
            continue
        if not isinstance(rec, dict) or "acc" not in rec:
            continue
        key = rec.get("round", f"line{i}")
        if key not in by_round:
            order.append(key)
        by_round[key] = rec
    recs = [by_round[k] for k in order]
    if all(isinstance(r.get("round"), (int, float)) for r in recs):
        recs.sort(key=lambda r: r["round"])
    return recs


def _savefig_atomic(fig, path: Path) -> None:
    savefig_atomic(fig, path, dpi=100, bbox_inches="tight")


def save_accuracy_plot(fig, ax, path: Path, title: str = "Balanced accuracy over rounds") -> None:
    """Label an accuracy-over-rounds axes, write the figure atomically and close it."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_xlabel("round")
    ax.set_ylabel("balanced test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title)
    _savefig_atomic(fig, path)
    plt.close(fig)


def _annotate_summary(m: dict) -> dict:
    skipped = m.get("skipped") or []
    damaged = m.get("damaged_shards") or []
    return {
        "images_in": m.get("images_in"),
        "captions_out": m.get("captions_out"),
        "skipped": len(skipped) if isinstance(skipped, list) else skipped,
        "damaged_shards": len(damaged) if isinstance(damaged, list) else damaged,
        "images_per_second": m.get("images_per_second"),
    }


def _pretrain_summary(m: dict) -> dict:
    keys = ("heldout_loss_alpha1_step0", "heldout_loss_alpha1", "heldout_loss_alpha0",
            "samples_per_second", "steps")
    return {k: m.get(k) for k in keys}


def _federated_summary(records: list[dict], fed_summary: dict | None) -> dict:
    last = records[-1]
    out: dict[str, Any] = {"round": last.get("round")}
    out.update({k: last.get(k) for k in ACC_KEYS})
    if "per_class" in last:
        out["per_class"] = last["per_class"]
    ba = last.get("before_align")
    if isinstance(ba, dict):
        out["before_align"] = {k: ba.get(k) for k in ACC_KEYS}
        if "per_class" in ba:
            out["before_align"]["per_class"] = ba["per_class"]
    if "align_loss" in last:
        out["align_loss"] = last["align_loss"]
    out["evaluations"] = len(records)
    if fed_summary:
        for k in ("rounds", "world_size"):
            if k in fed_summary:
                out[k] = fed_summary[k]
    return out


def _num(x: Any) -> float:
    """A plottable float: None / non-numbers become NaN (matplotlib leaves a gap)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return math.nan
    return float(x)


def _plot(out_dir: Path, records: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = records[-1]
    ba_last = last.get("before_align") if isinstance(last.get("before_align"), dict) else None
    written = []

    # accuracy over rounds
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r.get("round", i) for i, r in enumerate(records)]
    ax.plot(xs, [_num(r.get("acc")) for r in records], marker="o",
            label="after alignment" if any("before_align" in r for r in records) else "accuracy")
    if any(isinstance(r.get("before_align"), dict) for r in records):
        ys = [_num((r.get("before_align") or {}).get("acc")) for r in records]
        ax.plot(xs, ys, marker="s", linestyle="--", label="before alignment")
    save_accuracy_plot(fig, ax, out_dir / "accuracy.png")
    written.append("accuracy.png")

    # final per-class accuracy
    per_class = last.get("per_class") or []
    ba_pc = (ba_last or {}).get("per_class") or []
    n = max(len(per_class), len(ba_pc))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * n + 2), 4))
    if n:
        idx = list(range(n))
        pad = lambda v: [_num(x) for x in v] + [math.nan] * (n - len(v))  # noqa: E731
        if ba_pc:
            w = 0.4
            ax.bar([i - w / 2 for i in idx], pad(ba_pc), width=w, label="before alignment")
            ax.bar([i + w / 2 for i in idx], pad(per_class), width=w, label="after alignment")
            ax.legend()
        else:
            ax.bar(idx, pad(per_class), width=0.8)
        step = max(1, n // 40)  # keep labels readable for 100 / 1000 classes
        ax.set_xticks(idx[::step])
        ax.set_xticklabels([str(i) for i in idx[::step]], rotation=90 if n > 20 else 0)
    else:
        ax.text(0.5, 0.5, "no per-class accuracy recorded", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("class")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"Per-class accuracy, round {last.get('round')}")
    _savefig_atomic(fig, out_dir / "per_class.png")
    plt.close(fig)
    written.append("per_class.png")

    # Many / Medium / Few
    fig, ax = plt.subplots(figsize=(5, 4))
    idx = list(range(len(GROUPS)))
    after = [_num(last.get(k)) for _, k in GROUPS]
    series = [("after alignment" if ba_last else None, after)]
    if ba_last:
        series.insert(0, ("before alignment", [_num(ba_last.get(k)) for _, k in GROUPS]))
    w = 0.8 / len(series)
    for j, (label, vals) in enumerate(series):
        offs = [i + (j - (len(series) - 1) / 2) * w for i in idx]
        ax.bar(offs, vals, width=w, label=label)
        for x, v in zip(offs, vals):
            ax.text(x, 0.02 if math.isnan(v) else v + 0.01, "absent" if math.isnan(v) else f"{v:.2f}",
                    ha="center", va="bottom", fontsize=8, rotation=90 if math.isnan(v) else 0)
    ax.set_xticks(idx)
    ax.set_xticklabels([g for g, _ in GROUPS])
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.1)
    if ba_last:
        ax.legend()
    ax.set_title(f"Many / Medium / Few, round {last.get('round')}")
    _savefig_atomic(fig, out_dir / "groups.png")
    plt.close(fig)
    written.append("groups.png")
    return written


def write_report(run_dir: Path) -> dict:
    """Write `<run_dir>/report/summary.json` (final metrics of every stage present) and, when the run
    has federated metrics, `accuracy.png`, `per_class.png` and `groups.png` beside it. Returns the
    summary dict. Missing stages are left out; nothing missing raises."""
    run_dir = Path(run_dir)
    out_dir = run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)  # of a report killed while writing
    summary: dict[str, Any] = {"run_dir": str(run_dir)}

    manifest = _read_json(run_dir / "annotate" / "manifest.json")
    if manifest is not None:
        summary["annotate"] = _annotate_summary(manifest)
    pre = _read_json(run_dir / "pretrain" / "metrics.json")
    if pre is not None:
        summary["pretrain"] = _pretrain_summary(pre)

    records = read_evaluations(run_dir / "federated" / "metrics.jsonl")
    if records:
        fed_summary = _read_json(run_dir / "federated" / "summary.json")
        summary["federated"] = _federated_summary(records, fed_summary)

    # plots of a previous report must not outlive the metrics they were drawn from
    for name in PLOTS:
        if not records and (out_dir / name).exists():
            (out_dir / name).unlink()
    if records:
        summary["plots"] = _plot(out_dir, records)
    else:
        log.warning("report: no federated metrics under %s; summary without plots", run_dir)
        summary["plots"] = []

    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
