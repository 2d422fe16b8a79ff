"""The tables and the plot of ``compare``: one row per (method, seed) read from its run directory, then the
mean +- standard deviation over seeds per method.

Rank 0 writes into ``<run dir>/compare/``:

- ``results.md``: per method, mean +- sample standard deviation (n - 1) over the seeds of balanced accuracy,
  top-1 and Many/Medium/Few, with what ran (pretraining, alignment teacher, server-held labeled images),
  then the statistics table (:mod:`mllmfl_dist.commands.seed_statistics`): balanced accuracy at the final
  evaluation and its mean over the last ``last`` evaluations, each with sd and the 95% t-interval, the
  paired per-seed difference to FedAvg, rounds to a target and the tuned setting; then every seed's values,
  and on what data and machine they were measured;
- ``results.csv``: the same per method (``<metric>_mean`` / ``<metric>_std`` columns, std empty for one seed,
  then the statistics columns);
- ``results_per_seed.csv``: one row per (method, seed);
- ``accuracy.png``: balanced accuracy over rounds, the mean over seeds with a +-1 std band.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import statistics
from pathlib import Path
from typing import Any

from mllmfl_dist.config import Config
from mllmfl_dist.core.checkpoint import remove_stale_temps, write_text_atomic
from mllmfl_dist.core.jsonl import read_evaluations, read_jsonl
from mllmfl_dist.core.layout import RunLayout
from mllmfl_dist.fl.strategies import strategy_class
from mllmfl_dist.commands.compare_methods import Method
from mllmfl_dist.commands.seed_statistics import Spread, first_round_reaching, last_mean, paired_difference, spread
from mllmfl_dist.stages.report_plots import pyplot, save_accuracy_plot

METRICS = ("acc", "acc_top1", "acc_many", "acc_medium", "acc_few", "wall_seconds")
DESCRIPTION = ("method", "strategy", "pretraining", "align_teacher", "server_labeled_images", "models")
BASELINE = "fedavg"  # the row the paired differences are taken against
# acc_last: balanced test accuracy averaged over the last `last_evaluations` evaluations of a run.
PER_SEED_COLUMNS = (
    *DESCRIPTION,
    "seed",
    "rounds",
    *METRICS,
    "bytes_all_reduced_per_round",
    "acc_last",
    "last_evaluations",
    "target_acc",
    "rounds_to_target",
    "tuned",
    "tuned_configs",
)
STATISTICS = ("acc", "acc_last", "acc_minus_fedavg", "acc_last_minus_fedavg")
SUMMARY_COLUMNS = (
    *DESCRIPTION,
    "seeds",
    "rounds",
    *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")),
    "bytes_all_reduced_per_round",
    "last_evaluations",
    "acc_ci95",  # acc_mean / _std: above
    *(f"{m}_{s}" for m in STATISTICS[1:] for s in ("mean", "sd", "ci95")),
    "target_acc",
    "rounds_to_target_mean",
    "target_reached",
    "tuned",
    "tuned_configs",
)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def models_used(cfg: Config, dwp: bool) -> list[str]:
    """The MLLM / CLIP models a run used: its strategy's (CLIP2FL's CLIP), DWP's LLaVA, the alignment teacher."""
    used = [f"{m.role} {m.model}" for m in strategy_class(cfg.federated.strategy).models(cfg.strategy_sections)]
    if dwp:
        used.append(f"DWP LLaVA {cfg.pretrain.model or cfg.annotate.model}")
    if cfg.align.every and cfg.align.teacher not in ("none", "uniform"):
        used.append(f"teacher {cfg.align.teacher_model}")
    return used


def run_row(method: Method, seed: int, cfg: Config, last: int = 3, target: float | None = None) -> dict[str, Any]:
    """What one (method, seed) ran and measured, from its run directory: the final evaluation, the mean balanced
    test accuracy of the last ``last`` evaluations, the first round reaching balanced test accuracy ``target``."""
    paths = cfg.paths
    evaluations = read_evaluations(paths.metrics)
    rounds = read_jsonl(paths.rounds)
    final = evaluations[-1] if evaluations else {}
    alignment = _read_json(paths.summary).get("alignment") or {}
    teacher = cfg.align.teacher if cfg.align.every else None
    return {
        "method": method.name,
        "seed": seed,
        "strategy": cfg.federated.strategy,
        "pretraining": "dwp[llava]" if method.dwp else "none (random init)",
        "align_teacher": "no alignment" if teacher is None else "none (labels only)" if teacher == "none" else teacher,
        "models": "; ".join(models_used(cfg, method.dwp)) or "none",
        "server_labeled_images": alignment.get("server_labeled_images", 0) if cfg.align.every else 0,
        "rounds": final.get("round"),
        **{k: final.get(k) for k in METRICS if k != "wall_seconds"},
        "wall_seconds": sum(r.get("seconds", 0.0) for r in rounds) if rounds else None,
        "bytes_all_reduced_per_round": rounds[-1].get("bytes_all_reduced") if rounds else None,
        "acc_last": last_mean(evaluations, "acc", last),
        "last_evaluations": last,
        "target_acc": target,
        "rounds_to_target": first_round_reaching(evaluations, target, "acc") if target is not None else None,
        "tuned": "",
        "tuned_configs": None,
    }


def _mean_std(values: list[Any]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation; None where a value is missing (std also for one value)."""
    if not values or any(v is None for v in values):
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method (in first-seen order) with ``<metric>_mean`` / ``_std`` over its seeds, and the
    statistics columns: ``<acc|acc_last>_<mean|sd|ci95>`` and the same of the paired per-seed differences to
    the ``fedavg`` row (``acc_minus_fedavg_*``, empty without a fedavg row), rounds to the target."""
    methods: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        methods.setdefault(row["method"], []).append(row)
    baseline = methods.get(BASELINE, [])
    summary = []
    for runs in methods.values():
        out = {k: runs[0][k] for k in DESCRIPTION}
        out["seeds"] = [r["seed"] for r in runs]
        out["rounds"] = runs[0]["rounds"]
        out["bytes_all_reduced_per_round"] = runs[0]["bytes_all_reduced_per_round"]
        for metric in METRICS:
            out[f"{metric}_mean"], out[f"{metric}_std"] = _mean_std([r[metric] for r in runs])
        for key in ("last_evaluations", "target_acc", "tuned", "tuned_configs"):
            out[key] = runs[0].get(key)
        for metric in ("acc", "acc_last"):
            _put(out, metric, spread(_values(runs, metric)))
            paired = baseline and runs is not baseline
            diff = (
                paired_difference(_by_seed(runs, metric), _by_seed(baseline, metric))
                if paired
                else Spread(0, None, None, None)
            )
            _put(out, f"{metric}_minus_fedavg", diff)
        reached = [r["rounds_to_target"] for r in runs if r.get("rounds_to_target") is not None]
        out["rounds_to_target_mean"] = statistics.fmean(reached) if reached else None
        out["target_reached"] = f"{len(reached)}/{len(runs)}" if runs[0].get("target_acc") is not None else None
        summary.append(out)
    return summary


def _values(runs: list[dict[str, Any]], metric: str) -> list[float]:
    """Every seed's value, or none when a seed lacks it (no statistic over a partial set of seeds)."""
    values = [r.get(metric) for r in runs]
    return [] if any(v is None for v in values) else values


def _by_seed(runs: list[dict[str, Any]], metric: str) -> dict[int, float]:
    return {r["seed"]: r[metric] for r in runs if r.get(metric) is not None}


def _put(out: dict[str, Any], name: str, value: Spread) -> None:
    out[f"{name}_mean"], out[f"{name}_sd"], out[f"{name}_ci95"] = value.mean, value.sd, value.ci95


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    return str(value)


def _pm(row: dict[str, Any], metric: str, digits: int = 3) -> str:
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    return _fmt(mean, digits) if std is None or mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def measured_on(cfg: Config, world_size: int, backend: str) -> str:
    """One line: the data, the federated setting and the machine the figures come from."""
    data, fed = cfg.data, cfg.federated
    where = data.source if data.source != "shards" else f"shards {data.train_shards}"
    subset = f", train indices {data.train_indices}" if data.train_indices else ""
    return (
        f"Data: {where} (imb_factor {data.imb_factor:g}{subset}, server holdout "
        f"{data.server_holdout_per_class}/class), partition {cfg.partition.method}({cfg.partition.alpha:g}), "
        f"{fed.num_clients} clients, {fed.clients_per_round} per round, {fed.local_epochs} local epoch(s). "
        f"Measured with {world_size} rank(s) ({backend}) on {platform.machine()} with {os.cpu_count()} CPU "
        f"core(s) ({platform.system()})."
    )


def _spread_cell(row: dict[str, Any], name: str) -> str:
    mean, sd, ci = row[f"{name}_mean"], row[f"{name}_sd"], row[f"{name}_ci95"]
    if mean is None:
        return "—"
    return (
        f"{mean:+.3f}"
        if "minus" in name and sd is None
        else _fmt(mean)
        if sd is None
        else (f"{mean:{'+' if 'minus' in name else ''}.3f} ± {sd:.3f} (95% CI ± {ci:.3f})")
    )


def statistics_markdown(summary: list[dict[str, Any]]) -> list[str]:
    """The statistics table: final and last-evaluations balanced accuracy, paired differences to FedAvg, rounds
    to the target, the tuned setting (the last two only where asked for)."""
    if not summary:
        return []
    last, target = summary[0]["last_evaluations"], summary[0]["target_acc"]
    tuned = any(r["tuned_configs"] is not None for r in summary)
    head = [
        "method",
        *(["tuned setting (configurations tried)"] if tuned else []),
        "balanced acc, final",
        f"balanced acc, mean of last {last} evaluations",
        "paired difference to fedavg, final",
        f"paired difference to fedavg, last {last}",
        *([f"rounds to balanced test acc {target:g} (seeds reaching it)"] if target is not None else []),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        cells = [
            r["method"],
            *([f"{r['tuned'] or 'defaults'} ({r['tuned_configs']})"] if tuned else []),
            *(_spread_cell(r, m) for m in STATISTICS),
            *([f"{_fmt(r['rounds_to_target_mean'], 1)} ({r['target_reached']})"] if target is not None else []),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = summary[0]["seeds"]
    lines += [
        "",
        f"Balanced test accuracy over seeds {', '.join(map(str, seeds))}: mean ± sample standard deviation "
        "(n - 1) and the half-width of the 95% Student-t confidence interval of the mean (n - 1 degrees of "
        "freedom), at the final evaluation and averaged over each run's last "
        f"{last} evaluations. Paired difference: the row minus the fedavg row seed by seed (same data, "
        "partition and client order), with the same statistics."
        + (
            f" Rounds to target: the first evaluated round whose balanced test accuracy is at least "
            f"{target:g}, the mean over the seeds that reach it."
            if target is not None
            else ""
        )
        + (
            " Tuned setting: chosen on validation accuracy (tuning.json); the accuracies here are test "
            "accuracies of the chosen setting on the reporting seeds."
            if tuned
            else ""
        ),
    ]
    return lines


def results_markdown(rows: list[dict[str, Any]], footer: str = "") -> str:
    summary = summarize(rows)
    seeds = summary[0]["seeds"] if summary else []
    lines = [
        "| method | pretraining | alignment teacher | server-held labeled images | balanced acc | top-1 acc "
        "| Many | Medium | Few | wall time of the rounds (s) | models used |",
        "|" + "---|" * 11,
    ]
    for r in summary:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["method"],
                    r["pretraining"],
                    r["align_teacher"],
                    _fmt(r["server_labeled_images"]),
                    _pm(r, "acc"),
                    _pm(r, "acc_top1"),
                    _pm(r, "acc_many"),
                    _pm(r, "acc_medium"),
                    _pm(r, "acc_few"),
                    _pm(r, "wall_seconds", 1),
                    r["models"],
                ]
            )
            + " |"
        )
    spread = (
        "mean ± sample standard deviation (n - 1) over seeds " + ", ".join(map(str, seeds))
        if len(seeds) > 1
        else f"seed {seeds[0]}"
        if seeds
        else "no runs"
    )
    lines += [
        "",
        f"Test accuracy at the last evaluation (round {_fmt(summary[0]['rounds']) if summary else '—'}), "
        f"{spread}. Balanced acc is the mean of the per-class accuracies; top-1 the fraction of all test "
        "images; Many / Medium / Few the mean accuracy of the classes with > 100, 20-100 and < 20 training "
        "samples (—: no such class). CReFF and CLIP2FL are evaluated with their re-trained classifier. "
        "Server-held labeled images: labeled images the server trained on (alignment); DWP uses "
        "unlabeled captioned images. Wall time sums the rounds (one-off setup such as CLIP2FL's teacher "
        "pass is not counted).",
    ]
    lines += ["", *statistics_markdown(summary)] if summary else []
    if footer:
        lines += ["", footer]
    if len(seeds) > 1:
        lines += [
            "",
            "Per seed (balanced acc / Many / Medium / Few):",
            "",
            "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
            "|" + "---|" * (len(seeds) + 1),
        ]
        for method in summary:
            cells = [
                " / ".join(_fmt(r[k]) for k in ("acc", "acc_many", "acc_medium", "acc_few"))
                for r in rows
                if r["method"] == method["method"]
            ]
            lines.append(f"| {method['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(
            {k: "" if r[k] is None else (" ".join(map(str, r[k])) if isinstance(r[k], list) else r[k]) for k in columns}
        )
    return buffer.getvalue()


def results_csv(rows: list[dict[str, Any]]) -> str:
    return _csv(summarize(rows), SUMMARY_COLUMNS)


def per_seed_csv(rows: list[dict[str, Any]]) -> str:
    return _csv(rows, PER_SEED_COLUMNS)


def write_results(
    out_dir: Path, rows: list[dict[str, Any]], run_dirs: dict[str, list[Path]], cfg: Config, runtime: Any
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)  # of tables killed while being written
    write_text_atomic(
        out_dir / "results.md", results_markdown(rows, measured_on(cfg, runtime.world_size, runtime.backend))
    )
    write_text_atomic(out_dir / "results.csv", results_csv(rows))
    write_text_atomic(out_dir / "results_per_seed.csv", per_seed_csv(rows))
    save_mean_accuracy_plot(run_dirs, out_dir / "accuracy.png")


def save_mean_accuracy_plot(run_dirs: dict[str, list[Path]], path: Path) -> None:
    """Balanced accuracy over rounds per method: the mean over its seeds' runs, with a +-1 std band."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for method, dirs in run_dirs.items():
        by_round: dict[int, list[float]] = {}
        for run_dir in dirs:
            for record in read_evaluations(RunLayout(run_dir).metrics):
                by_round.setdefault(record["round"], []).append(record["acc"])
        rounds = sorted(r for r, values in by_round.items() if len(values) == len(dirs))
        if not rounds:
            continue
        means = [statistics.fmean(by_round[r]) for r in rounds]
        (line,) = ax.plot(rounds, means, marker="o", markersize=3, label=method)
        if len(dirs) > 1:
            stds = [statistics.stdev(by_round[r]) for r in rounds]
            ax.fill_between(
                rounds,
                [m - s for m, s in zip(means, stds)],
                [m + s for m, s in zip(means, stds)],
                color=line.get_color(),
                alpha=0.2,
                linewidth=0,
            )
    spread = " (mean ± std over seeds)" if any(len(d) > 1 for d in run_dirs.values()) else ""
    save_accuracy_plot(fig, ax, path, title=f"Balanced accuracy over rounds{spread}")
