"""``compare``: several methods on identical data, partition, seeds and ranks, and one table of the results.

Each method is the given config with as little changed as possible, run in ``<run dir>/compare/<method>/``
through the same ``run`` pipeline (so each is resumable on its own, and a finished one is not trained
again):

- ``fedavg``, ``fedavgm``, ``fedprox``, ``creff``, ``clip2fl``: ``federated.strategy`` set to the method,
  alignment off (``align.every = 0``) and a randomly initialised backbone (``model.pretrained_backbone =
  ""``): the baselines, without any stage of the MLLM method;
- ``mllm``: the config as written (its strategy, DWP pretraining and global alignment), which must use at
  least one stage of the method (``align.every > 0`` or ``model.pretrained_backbone = "pretrain"``).

Rank 0 then writes ``<run dir>/compare/results.md`` and ``results.csv`` (overall and Many/Medium/Few
accuracy of the last evaluation, rounds, wall time of the rounds, bytes all-reduced per round) and
``accuracy.png`` (accuracy over rounds of every method).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from mllmfl_dist import dist
from mllmfl_dist.checkpoint import write_text_atomic
from mllmfl_dist.config import Config, ConfigError, validate

log = logging.getLogger(__name__)

BASELINES = ("fedavg", "fedavgm", "fedprox", "creff", "clip2fl")
METHODS = (*BASELINES, "mllm")
COLUMNS = ("method", "strategy", "rounds", "acc", "acc_many", "acc_medium", "acc_few", "wall_seconds",
           "bytes_all_reduced_per_round")


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ConfigError(f"--strategies {text!r}: {'unknown ' + ', '.join(unknown) if unknown else 'empty'}; "
                          f"choose from {', '.join(METHODS)} (comma-separated)")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--strategies {text!r} names a method twice")
    return methods


def compare_dir(cfg: Config) -> Path:
    return cfg.run_dir / "compare"


def method_config(cfg: Config, method: str) -> Config:
    """The config of one method of the comparison (see the module docstring)."""
    run = dataclasses.replace(cfg.run, root=str(compare_dir(cfg)), name=method)
    if method == "mllm":
        if cfg.align.every == 0 and cfg.model.pretrained_backbone != "pretrain":
            raise ConfigError("compare: the mllm method runs the config as written, which uses no stage of the "
                              "method; set align.every > 0 (with an [align] source) and/or "
                              "model.pretrained_backbone = 'pretrain'")
        method_cfg = dataclasses.replace(cfg, run=run)
    elif method in BASELINES:
        method_cfg = dataclasses.replace(
            cfg, run=run, federated=dataclasses.replace(cfg.federated, strategy=method),
            align=dataclasses.replace(cfg.align, every=0),
            model=dataclasses.replace(cfg.model, pretrained_backbone=""))
    else:
        raise ConfigError(f"compare: unknown method {method!r}; choose from {', '.join(METHODS)}")
    try:
        validate(method_cfg)
    except ConfigError as err:
        raise ConfigError(f"compare: method {method}: {err}") from None
    return method_cfg


def run_compare(cfg: Config, runtime: dist.Runtime, methods: list[str]) -> list[dict[str, Any]]:
    """Run (or resume, or skip when complete) every method, then write the tables and the plot on rank 0.
    Returns the table's rows on rank 0."""
    from mllmfl_dist.pipeline import run_pipeline

    configs = [method_config(cfg, m) for m in methods]  # every config is checked before anything runs
    for i, (method, method_cfg) in enumerate(zip(methods, configs), 1):
        log.info("compare: method %d/%d: %s -> %s", i, len(methods), method, method_cfg.run_dir)
        run_pipeline(method_cfg, runtime)
    rows: list[dict[str, Any]] = []
    if runtime.is_server:
        rows = [method_row(method, method_cfg) for method, method_cfg in zip(methods, configs)]
        write_results(compare_dir(cfg), rows, {m: c.run_dir for m, c in zip(methods, configs)})
    dist.stage_barrier(runtime)
    return rows


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn last line of an interrupted run
        if isinstance(record, dict):
            records.append(record)
    return records


def method_row(method: str, method_cfg: Config) -> dict[str, Any]:
    from mllmfl_dist.stages.report import read_evaluations

    out = method_cfg.run_dir / "federated"
    evaluations = read_evaluations(out / "metrics.jsonl")
    rounds = _jsonl(out / "rounds.jsonl")
    final = evaluations[-1] if evaluations else {}
    return {
        "method": method,
        "strategy": method_cfg.federated.strategy,
        "rounds": final.get("round"),
        **{k: final.get(k) for k in ("acc", "acc_many", "acc_medium", "acc_few")},
        "wall_seconds": sum(r.get("seconds", 0.0) for r in rounds) if rounds else None,
        "bytes_all_reduced_per_round": rounds[-1].get("bytes_all_reduced") if rounds else None,
    }


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    return str(value)


def results_markdown(rows: list[dict[str, Any]]) -> str:
    header = ("| method | strategy | rounds | acc | Many | Medium | Few | wall time of the rounds (s) "
              "| bytes all-reduced / round |")
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lines.append("| " + " | ".join([r["method"], r["strategy"], _fmt(r["rounds"]), _fmt(r["acc"]),
                                        _fmt(r["acc_many"]), _fmt(r["acc_medium"]), _fmt(r["acc_few"]),
                                        _fmt(r["wall_seconds"], 1), _fmt(r["bytes_all_reduced_per_round"])]) + " |")
    lines += ["", "Accuracy on the balanced test set at the last evaluation; Many / Medium / Few are the mean "
              "accuracies of classes with > 100, 20-100 and < 20 training samples (— : no such class). "
              "CReFF and CLIP2FL are evaluated with their re-trained classifier. Wall time sums the rounds "
              "(setup, such as CLIP2FL's one-off teacher pass, is not counted)."]
    return "\n".join(lines) + "\n"


def results_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r[k] is None else r[k] for k in COLUMNS})
    return buffer.getvalue()


def write_results(out_dir: Path, rows: list[dict[str, Any]], run_dirs: dict[str, Path]) -> None:
    from mllmfl_dist.stages.report import read_evaluations, save_accuracy_plot

    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "results.md", results_markdown(rows))
    write_text_atomic(out_dir / "results.csv", results_csv(rows))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, run_dir in run_dirs.items():
        records = read_evaluations(run_dir / "federated" / "metrics.jsonl")
        if records:
            ax.plot([r["round"] for r in records], [r["acc"] for r in records], marker="o", markersize=3,
                    label=method)
    save_accuracy_plot(fig, ax, out_dir / "accuracy.png")
