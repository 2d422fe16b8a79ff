"""Stage report: final metrics of every stage of a run, the models it used, PNG plots and report.md.

:func:`write_report` is pure file-in / file-out (no torch, no torch.distributed); :class:`ReportStage` runs it
on rank 0 as ``run``'s last stage, and ``python -m mllmfl_dist report RUN_DIR`` runs it on any finished or
interrupted run.

Reads, when present,
  <run>/config.toml                  -> which MLLM / CLIP models the run used (summary["models"])
  <run>/annotate/manifest.json       -> summary["annotate"]
  <run>/pretrain/metrics.json        -> summary["pretrain"]
  <run>/federated/metrics.jsonl      -> summary["federated"] (last evaluation)
  <run>/federated/summary.json       -> rounds, world size, class names, the alignment set
  <run>/federated/partition.json     -> the partition heatmap
  <run>/baseline/federated/...       -> summary["baseline"]: FedAvg from scratch on the same data and seed
and writes into <run>/report/
  summary.json, report.md            everything above; report.md shows the plots beside the tables
  accuracy.png                       balanced accuracy over rounds: the method (before / after alignment),
                                     the baseline, chance
  per_class.png, groups.png          final per-class (named) and Many / Medium / Few accuracy
  partition.png                      samples per class on each client
Stages that are absent are left out; without federated metrics no plots are drawn.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from mllmfl_dist.config.loader import read_toml
from mllmfl_dist.config import Config
from mllmfl_dist.core import dist, run_lock
from mllmfl_dist.core.checkpoint import remove_stale_temps, write_text_atomic
from mllmfl_dist.core.errors import ConfigError
from mllmfl_dist.core.jsonl import ACCURACY_KEYS, VAL_ACCURACY_KEYS, read_evaluations
from mllmfl_dist.core.layout import RunLayout
from mllmfl_dist.stages import report_plots
from mllmfl_dist.config.plugins import strategy_class
from mllmfl_dist.stages.protocol import FRESH, StageStatus

log = logging.getLogger(__name__)

PLOTS = ("accuracy.png", "per_class.png", "groups.png", "partition.png")


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
    keys = ("heldout_loss_alpha1_step0", "heldout_loss_alpha1", "heldout_loss_alpha0", "samples_per_second", "steps")
    out = {k: m.get(k) for k in keys}
    probe = m.get("probe")
    if isinstance(probe, dict) and "dwp" in probe:  # the linear probe's balanced test accuracy (probe.py)
        out.update({f"probe_acc_{name}": (probe.get(name) or {}).get("acc") for name in ("dwp", "random_init")})
    return out


def _federated_summary(records: list[dict], fed_summary: dict | None) -> dict:
    last = records[-1]
    out: dict[str, Any] = {"round": last.get("round")}
    out.update({k: last.get(k) for k in ACCURACY_KEYS})
    out.update({k: last[k] for k in VAL_ACCURACY_KEYS if k in last})  # runs with a validation split
    if "per_class" in last:
        out["per_class"] = last["per_class"]
    ba = last.get("before_align")
    if isinstance(ba, dict):
        out["before_align"] = {k: ba.get(k) for k in ACCURACY_KEYS}
        out["before_align"].update({k: ba[k] for k in VAL_ACCURACY_KEYS if k in ba})
        if "per_class" in ba:
            out["before_align"]["per_class"] = ba["per_class"]
    if "align_loss" in last:
        out["align_loss"] = last["align_loss"]
    out["evaluations"] = len(records)
    if fed_summary:
        for k in ("rounds", "world_size", "dp"):
            if k in fed_summary:
                out[k] = fed_summary[k]
    return out


def read_run_config(run_dir: Path) -> dict:
    """The run's config.toml as a dict ({} where there is none); ConfigError naming the file when it is there
    but not UTF-8 TOML, since the report would otherwise silently lose the models and strategy it names."""
    path = RunLayout(run_dir).config
    if not path.is_file():
        return {}
    return read_toml(path)


def model_provenance(spec: str) -> dict[str, Any]:
    """Where a model came from, read from the build beside it (``tiny-models DIR [--train CORPUS]`` writes
    ``DIR/tiny_models.json`` and, when trained, ``DIR/model_card.json`` next to ``DIR/llava`` and
    ``DIR/clip``): ``trained here`` (with the card's measurements), ``tiny random (no knowledge)``, another
    local directory, or a hub / cache name."""
    path = Path(spec.removeprefix("local-dir:")).expanduser()
    out: dict[str, Any] = {"model": spec}
    manifest = _read_json(path.parent / "tiny_models.json") if path.is_dir() else None
    if manifest is not None and manifest.get("trained") is True:
        card = _read_json(path.parent / "model_card.json") or {}
        out.update(kind="trained here", card=card.get("measured", card))
    elif manifest is not None:
        out["kind"] = "tiny random (no knowledge)"
    else:
        out["kind"] = "local directory" if path.is_dir() else "hub / cache name"
    return out


def models_used(config: dict, strategy_models: list[dict] = ()) -> list[dict[str, Any]]:
    """The MLLM and CLIP models a run's config used (``strategy_models``: those its strategy named, from the
    federated summary), with their provenance."""
    section = lambda name: config.get(name) or {}  # noqa: E731
    model, annotate, pretrain, align = section("model"), section("annotate"), section("pretrain"), section("align")
    roles = []
    if model.get("pretrained_backbone") == "pretrain":
        if not pretrain.get("shards") and annotate.get("model"):
            roles.append(("annotation LLaVA", annotate["model"]))
        if pretrain.get("model") or annotate.get("model"):
            roles.append(("DWP LLaVA", pretrain.get("model") or annotate["model"]))
    if align.get("every") and align.get("teacher") not in (None, "none", "uniform") and align.get("teacher_model"):
        roles.append((f"alignment teacher ({align['teacher']})", align["teacher_model"]))
    roles += [(m["role"], m["model"]) for m in strategy_models if m.get("model")]
    return [{"role": role, **model_provenance(spec)} for role, spec in roles]


def card_numbers(card: dict) -> dict[str, float]:
    """The measured accuracies of a model card (the numbers a reader compares)."""
    return {k: v for k, v in card.items() if isinstance(v, float) and k.endswith(("_acc", "accuracy"))}


def _fmt(value: Any) -> str:
    return "—" if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{value:.3f}"


def teacher_lines(fed: dict) -> list[str]:
    """A table of the run's teachers (CLIP2FL's on the clients' samples, the alignment teacher on its set): the
    accuracy, mean entropy and top probability of the distributions the losses use, so an over-confident
    (entropy near 0) or wrong teacher is seen beside the results; [] when the run had none."""
    rows = []
    clip2fl = fed.get("clip2fl_teacher")
    if isinstance(clip2fl, dict):
        rows.append(
            (
                f"CLIP2FL, clients' {clip2fl.get('samples')} samples, scale {_fmt(clip2fl.get('logit_scale'))}, "
                f"T {clip2fl.get('temperature')}",
                clip2fl.get("accuracy"),
                clip2fl.get("mean_entropy_nats"),
                clip2fl.get("max_entropy_nats"),
                clip2fl.get("mean_top_probability"),
            )
        )
    align = fed.get("alignment")
    if isinstance(align, dict) and align.get("teacher_mean_entropy_nats") is not None:
        scale = align.get("teacher_logit_scale")
        rows.append(
            (
                f"alignment ({align.get('teacher')}), its {align.get('images')} images"
                + (f", scale {_fmt(scale)}" if scale is not None else ""),
                align.get("teacher_accuracy"),
                align.get("teacher_mean_entropy_nats"),
                align.get("teacher_max_entropy_nats"),
                align.get("teacher_mean_top_probability"),
            )
        )
    if not rows:
        return []
    lines = [
        "",
        "| teacher | accuracy | mean entropy (nats) | uniform's entropy | mean top probability |",
        "|---|---|---|---|---|",
    ]
    return lines + [f"| {name} | " + " | ".join(_fmt(v) for v in values) + " |" for name, *values in rows]


def report_markdown(summary: dict) -> str:
    """report.md: what ran, the final accuracies beside the baseline and chance, the models, the plots."""
    lines = [f"# Report: {summary['run_dir']}", ""]
    fed, base = summary.get("federated"), summary.get("baseline")
    if fed:
        # Validation beside test where the run has a validation split (data.val_per_class).
        val = [k for k in VAL_ACCURACY_KEYS[:2] if k in fed]
        lines += [
            "| | balanced acc | top-1 | Many | Medium | Few |" + " val balanced acc | val top-1 |" * bool(val),
            "|---|---|---|---|---|---|" + "---|---|" * bool(val),
        ]
        row = lambda name, r: f"| {name} | " + " | ".join(_fmt(r.get(k)) for k in (*ACCURACY_KEYS, *val)) + " |"  # noqa: E731
        aligned = isinstance(fed.get("before_align"), dict)
        lines.append(row(f"method, round {fed.get('round')}" + (" (after alignment)" if aligned else ""), fed))
        if aligned:
            lines.append(row("method, before the last alignment", fed["before_align"]))
        if base:
            lines.append(row(f"FedAvg from scratch, round {base.get('round')}", base))
        if fed.get("chance"):
            lines.append(f"| chance | {fed['chance']:.3f} | | | | |" + f" {fed['chance']:.3f} | |" * bool(val))
        lines += [
            "",
            "Balanced acc is the mean of the per-class accuracies; Many / Medium / Few the mean accuracy "
            "of the classes with > 100, 20-100 and < 20 training samples (—: no such class)."
            + (
                " Val: the same on the validation split carved from the training split (data.val_per_class), "
                "on which settings are chosen; the other columns are the test set's."
                if val
                else ""
            ),
        ]
        alignment = fed.get("alignment")
        if alignment:
            teacher_acc = alignment.get("teacher_accuracy")
            lines += [
                "",
                f"Alignment set: {alignment.get('images')} images ({alignment.get('source')}), "
                f"{alignment.get('server_labeled_images')} with server-held labels; teacher "
                f"{alignment.get('teacher')}"
                + (
                    f", whose accuracy on the set's labels is {teacher_acc:.3f}"
                    if isinstance(teacher_acc, float)
                    else ""
                )
                + ".",
            ]
        dp = fed.get("dp")
        if isinstance(dp, dict):
            lines += [
                "",
                f"Central DP (DP-FedAvg): ({dp.get('epsilon', float('nan')):.3g}, {dp.get('delta')})-DP "
                f"at the client level after {fed.get('rounds')} rounds ({dp.get('accountant')} accountant; "
                f"clip norm {dp.get('clip_norm')}, noise multiplier {dp.get('noise_multiplier', 0):.4g}).",
            ]
        lines += teacher_lines(fed)
    if summary.get("models"):
        lines += ["", "## Models", "", "| role | model | provenance | model card |", "|---|---|---|---|"]
        for m in summary["models"]:
            numbers = ", ".join(f"{k} {v:.3f}" for k, v in card_numbers(m.get("card") or {}).items())
            lines.append(f"| {m['role']} | `{m['model']}` | {m['kind']} | {numbers or '—'} |")
    for stage in ("annotate", "pretrain"):
        if summary.get(stage):
            values = ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in summary[stage].items()
                if v is not None
            )
            lines += ["", f"**{stage}:** {values}"]
    if summary.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{name[:-4]}]({name})" for name in summary["plots"]]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path) -> dict:
    """Write ``<run_dir>/report/``: summary.json (final metrics of every stage present, the models used and
    where they came from), the plots and report.md. Returns the summary dict. Missing stages are left out;
    nothing missing raises."""
    run_dir = Path(run_dir)
    paths = RunLayout(run_dir)
    config = read_run_config(run_dir)  # first: a config.toml that cannot be read refuses the report before it writes
    out_dir = paths.report
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)  # of a report killed while writing
    summary: dict[str, Any] = {"run_dir": str(run_dir)}

    fed_summary = _read_json(paths.summary) or {}
    strategy_models = fed_summary.get("strategy_models")
    if strategy_models is None:  # a summary written before it recorded them: ask the strategy
        strategy_models = _strategy_models(config)
    models = models_used(config, strategy_models)
    if models:
        summary["models"] = models
    manifest = _read_json(paths.manifest)
    if manifest is not None:
        summary["annotate"] = _annotate_summary(manifest)
    pre = _read_json(paths.pretrain_metrics)
    if pre is not None:
        summary["pretrain"] = _pretrain_summary(pre)

    records = read_evaluations(paths.metrics)
    baseline = read_evaluations(paths.baseline.metrics)
    if records:
        summary["federated"] = _federated_summary(records, fed_summary)
        per_class = records[-1].get("per_class") or []
        if per_class:
            summary["federated"]["chance"] = 1 / len(per_class)
        if fed_summary.get("alignment"):
            summary["federated"]["alignment"] = fed_summary["alignment"]
        if fed_summary.get("clip2fl_teacher"):
            summary["federated"]["clip2fl_teacher"] = fed_summary["clip2fl_teacher"]
    if baseline:
        summary["baseline"] = _federated_summary(baseline, None)

    # plots of a previous report must not outlive the metrics they were drawn from
    for name in PLOTS:
        if (out_dir / name).exists():
            (out_dir / name).unlink()
    summary["plots"] = []
    if records:
        class_names = fed_summary.get("class_names") or []
        method = (config.get("federated") or {}).get("strategy", "method")
        report_plots.accuracy_plot(
            out_dir / "accuracy.png", records, baseline, summary["federated"].get("chance"), method
        )
        report_plots.per_class_plot(
            out_dir / "per_class.png", records[-1], class_names, baseline[-1] if baseline else None
        )
        report_plots.groups_plot(out_dir / "groups.png", records[-1], baseline[-1] if baseline else None)
        summary["plots"] = ["accuracy.png", "per_class.png", "groups.png"]
        partition = _read_json(paths.partition)
        counts = (partition or {}).get("class_counts")
        if counts:
            report_plots.partition_plot(out_dir / "partition.png", counts, class_names)
            summary["plots"].append("partition.png")
    else:
        log.warning("report: no federated metrics under %s; summary without plots", run_dir)

    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    write_text_atomic(out_dir / "report.md", report_markdown(summary))
    return summary


def _strategy_models(config: dict) -> list[dict[str, Any]]:
    """The models the run's strategy names in its sections, rebuilt from ``config.toml``'s values (runs whose
    federated summary predates ``strategy_models``); none where the strategy or its sections cannot be had."""
    try:
        cls = strategy_class(str((config.get("federated") or {}).get("strategy", "")))
        sections = {name: options(**(config.get(name) or {})) for name, options in cls.sections.items()}
        return [dataclasses.asdict(use) for use in cls.models(sections)]
    except (ConfigError, TypeError, ValueError) as err:
        log.warning("report: the strategy's models cannot be read from the config (%s)", err)
        return []


class ReportStage:
    """The report through the stage protocol (:mod:`mllmfl_dist.stages.protocol`): never complete, since it sums
    the other stages' outputs, which a rerun may have extended; rank 0 writes it."""

    name = "report"

    def outputs(self, cfg: Config) -> list[Path]:
        report = cfg.paths.report
        return [report / "summary.json", report / "report.md"]

    def status(self, cfg: Config) -> StageStatus:
        verb = "rewrites" if (cfg.paths.report / "summary.json").is_file() else "writes"
        return StageStatus(FRESH, f"{verb} {cfg.paths.report} from the stages' outputs")

    def run(self, cfg: Config, runtime: dist.Runtime) -> dict[str, Any]:
        if not runtime.is_server:
            return {}
        # A `report` command on this run may be writing the same folder: wait for it (seconds).
        with run_lock.holding_report(cfg.paths.report, runtime.run_locks.command, wait=True):
            return write_report(cfg.run_dir)
