"""``probe CONFIG --backbone SPEC [--backbone SPEC ...]``: linear-probe accuracy of frozen backbones on the
config's data, one table for all of them (the recipe: :mod:`mllmfl_dist.fl.probe`).

What it answers: how much class information a backbone's pooled features carry, independently of any
classifier head, so a DWP backbone, a federated model, a random initialisation and the CLIP stand-in can be
compared on the same labelled images. A SPEC is

- a file: a federated ``model_final.pt`` (state dict) or ``checkpoint.pt`` (its ``model``), or a DWP
  ``backbone.pt``; loaded into the config's ``[model]`` (heads and projections are ignored);
- ``random:SEED``: the config's ``[model]`` initialised as runs with ``run.seed = SEED`` initialise it
  (``random:<run.seed>`` is the network federated finetuning and DWP start from);
- ``clip:MODEL`` or ``clip:MODEL@PRETRAINED``: an open_clip image tower, MODEL as ``clip2fl.model`` spells it
  (``local-dir:DIR``, ``hf-hub:org/repo`` or an architecture such as ``ViT-B-32@openai``).

Over seeds (``--seeds 0,1,2,3,4``): a SPEC holding ``{seed}`` is probed once per seed with ``{seed}``
replaced (``random:{seed}``, ``runs/x/compare/fedavg/<config id>/seed{seed}/federated/model_final.pt``), and
the table gives each such SPEC's mean, sample standard deviation and 95% Student-t interval over the seeds
(:mod:`mllmfl_dist.commands.seed_statistics`); a SPEC without ``{seed}`` is probed once. The probe's images
(holdout, val, test) come from the config alone, so every seed's backbone is probed on the same ones.

Written (this module imports no torch at load: the parser is built from it): ``<run dir>/probe/probe.json``
and ``probe.md`` (or ``--out PATH.json`` and the ``.md`` beside it); the markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from mllmfl_dist.config import Config, ConfigError
from mllmfl_dist.core.preflight import expand_user

# The probe's own modules (torch, the stages' data and model) are imported inside the functions that run it:
# this module adds `probe` to the CLI's parser, and `--help` must answer without torch.

log = logging.getLogger(__name__)

SEED_FIELD = "{seed}"
SPEC_FORMS = (
    "a model_final.pt / checkpoint.pt / backbone.pt path, random:SEED, or clip:MODEL[@PRETRAINED] "
    "(e.g. clip:local-dir:runs/standins/clip)"
)
TRAIN_SETS = ("holdout", "clients")


def add_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--backbone",
        dest="backbones",
        action="append",
        required=True,
        metavar="SPEC",
        help=f"a backbone to probe (repeatable): {SPEC_FORMS}",
    )
    sub.add_argument(
        "--train-set",
        choices=TRAIN_SETS,
        default="holdout",
        help="the probe's labelled train images: holdout = the server's class-balanced holdout "
        "(data.server_holdout_per_class, default), clients = every client's images (long-tailed)",
    )
    sub.add_argument(
        "--seeds",
        default=None,
        metavar="LIST",
        help="probe every SPEC holding {seed} once per seed of LIST (e.g. 0,1,2,3,4) and report its "
        "mean, sd and 95%% t interval over them",
    )
    sub.add_argument(
        "--out",
        default=None,
        metavar="PATH.json",
        help="where the JSON goes (the markdown beside it); default <run dir>/probe/probe.json",
    )


def expand_seeds(specs: list[str], seeds: list[int] | None) -> list[tuple[str, str, int | None]]:
    """``(template, spec, seed)`` for every probe to run: a template holding ``{seed}`` once per seed (needs
    ``seeds``), any other once with seed None. ConfigError for ``{seed}`` without seeds, or seeds that no
    template uses."""
    marked = [spec for spec in specs if SEED_FIELD in spec]
    if marked and not seeds:
        raise ConfigError(f"--backbone {marked[0]} holds {SEED_FIELD}: give --seeds (e.g. --seeds 0,1,2,3,4)")
    if seeds and not marked:
        raise ConfigError(f"--seeds is given but no --backbone holds {SEED_FIELD} (e.g. random:{SEED_FIELD})")
    return [
        (spec, spec.replace(SEED_FIELD, str(seed)), seed)
        for spec in specs
        for seed in (seeds if SEED_FIELD in spec and seeds else [None])
    ]


def run_probe(
    cfg: Config, specs: list[str], train_set: str = "holdout", out: str | None = None, seeds: list[int] | None = None
) -> dict[str, Any]:
    """Probe every SPEC (each SPEC holding ``{seed}`` once per seed of ``seeds``) on the config's data; write
    the JSON and the markdown, print the table; returns the JSON content. Raises ConfigError (a bad SPEC, an
    empty train set) before any probe runs."""
    probes = expand_seeds(specs, seeds)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("probe runs as one process (python -m mllmfl_dist probe ...), not under torchrun/srun")
    import torch

    from mllmfl_dist.core import checkpoint
    from mllmfl_dist.fl.probe import RECIPE, linear_probe, probe_sets
    from mllmfl_dist.stages.inputs import build_data

    data = build_data(cfg)
    try:
        sets = probe_sets(data, train_set)
    except ValueError as err:
        hint = ", or use --train-set clients" if train_set == "holdout" else ""
        raise ConfigError(f"probe: {err}{hint}") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Every SPEC is checked (its file read) before the first probe runs, so a typo costs no probing; each is
    # loaded again when its turn comes, so only one backbone is in memory at a time.
    kinds = [backbone_featurizer(spec, cfg, data, device)[0] for _, spec, _ in probes]
    rows = []
    for index, ((template, spec, seed), kind) in enumerate(zip(probes, kinds), 1):
        featurize = backbone_featurizer(spec, cfg, data, device)[1]
        started = time.perf_counter()
        try:
            result = linear_probe(featurize, sets)
        except ValueError as err:
            raise ConfigError(f"probe: --backbone {spec}: {err}") from None
        log.info(
            "probe %d/%d: %s: balanced acc %.4f (%.0f s)",
            index,
            len(probes),
            spec,
            result["acc"],
            time.perf_counter() - started,
        )
        rows.append(
            {
                "backbone": spec,
                "kind": kind,
                **({"template": template, "seed": seed} if seed is not None else {}),
                **result,
            }
        )
    n_test = len(sets.test[1])
    report = {
        "run_dir": str(cfg.run_dir),
        "data": cfg.data.source,
        "train_set": sets.train_name,
        "test_set": f"balanced test set ({n_test} images)",
        "val_set": f"validation set ({len(sets.val[1])} images)" if sets.val is not None and len(sets.val[1]) else None,
        "recipe": RECIPE,
        "device": str(device),
        "rows": rows,
        **({"seeds": seeds, "over_seeds": over_seeds(rows)} if seeds else {}),
    }
    json_path = Path(out) if out else cfg.run_dir / "probe" / "probe.json"
    markdown = probe_markdown(report)
    checkpoint.write_text_atomic(json_path, json.dumps(report, indent=2))
    checkpoint.write_text_atomic(json_path.with_suffix(".md"), markdown)
    print(markdown, end="")
    print(f"probe: {json_path} and {json_path.with_suffix('.md')}")
    return report


def backbone_featurizer(spec: str, cfg: Config, data, device):
    """(kind, featurizer) of one SPEC; ConfigError (or ModelLoadError for a CLIP model) with one line when the
    SPEC names nothing usable."""
    from mllmfl_dist.fl.probe import clip_image_features, pooled_features
    from mllmfl_dist.stages.inputs import build_fl_model

    if spec.startswith("clip:"):
        from mllmfl_dist.mllm.clip_teacher import load_clip

        model, pretrained = _clip_spec(expand_user(spec[len("clip:") :]))  # the shell expands no ~ after clip:
        clip, preprocess, _ = load_clip(model, pretrained, device=device)
        return "clip image tower", lambda images: clip_image_features(clip, preprocess, images)
    if spec.startswith("random:"):
        seed = spec[len("random:") :]
        if not seed.isdigit():
            raise ConfigError(f"--backbone {spec}: random:SEED needs a non-negative integer seed, e.g. random:0")
        model, kind = build_fl_model(cfg.model, data, int(seed)), f"random init (seed {int(seed)})"
    else:
        model, kind = _load_file(expand_user(spec), cfg, data)
    model.to(device)
    return kind, lambda images: pooled_features(model, images, data.mean, data.std, device=device)


def _clip_spec(text: str) -> tuple[str, str]:
    if not text:
        raise ConfigError(f"--backbone clip: names no model; {SPEC_FORMS}")
    if text.startswith(("local-dir:", "hf-hub:")) or "@" not in text:
        return text, ""
    model, _, pretrained = text.rpartition("@")
    return model, pretrained


def _load_file(spec: str, cfg: Config, data):
    from mllmfl_dist.core import checkpoint
    from mllmfl_dist.stages.inputs import build_fl_model

    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--backbone {spec}: no such file; a SPEC is {SPEC_FORMS}")
    state = checkpoint.load_or_explain(path, "--backbone")
    kind = "backbone"
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state, kind = state["model"], "training checkpoint"
    elif isinstance(state, dict) and "classifier.weight" in state:
        kind = "model"
    if not isinstance(state, dict) or not state:
        raise ConfigError(f"--backbone {spec} holds no state dict")
    model = build_fl_model(cfg.model, data, cfg.run.seed)
    try:
        model.load_backbone_state_dict(state)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(
            f"--backbone {spec} does not fit the config's model ({cfg.model.arch}, width_scale "
            f"{cfg.model.width_scale}): {str(err).splitlines()[0]}"
        ) from None
    return model, kind


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def over_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per ``{seed}`` template of ``rows`` (in first-seen order): n, and the mean, sd and 95% t half-width of
    ``acc`` (balanced test) and ``val_acc`` over its seeds."""
    from mllmfl_dist.commands.seed_statistics import spread

    templates = list(dict.fromkeys(row["template"] for row in rows if "template" in row))
    summary = []
    for template in templates:
        mine = [row for row in rows if row.get("template") == template]
        entry: dict[str, Any] = {"template": template, "kind": mine[0]["kind"], "seeds": [r["seed"] for r in mine]}
        for key in ("acc", "val_acc"):
            values = [r[key] for r in mine if r.get(key) is not None]
            entry[key] = vars(spread(values)) if len(values) == len(mine) else None
        summary.append(entry)
    return summary


def _spread_cell(stats: dict[str, Any] | None) -> str:
    if stats is None or stats["mean"] is None:
        return "-"
    if stats["sd"] is None:
        return f"{stats['mean']:.4f}"
    return f"{stats['mean']:.4f} +- {stats['sd']:.4f} (95% CI +- {stats['ci95']:.4f})"


def probe_markdown(report: dict[str, Any]) -> str:
    """The table of a probe report: one row per backbone."""
    val = any("val_acc" in row for row in report["rows"])
    columns = ["backbone", "features", "probe acc (balanced)", "top-1", *(["val acc"] if val else []), "train acc"]
    lines = [
        f"Linear probe: trained on the {report['train_set']}, scored on the {report['test_set']}"
        + (f" and the {report['val_set']}" if report.get("val_set") else "")
        + ".",
        f"Recipe: {report['recipe']}.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in report["rows"]:
        flag = "" if row["converged"] else " (lbfgs not converged)"
        lines.append(
            f"| {row['backbone']} | {row['kind']}, {row['feature_dim']}-d{flag} | {_fmt(row['acc'])} | "
            f"{_fmt(row['acc_top1'])} |"
            + (f" {_fmt(row.get('val_acc'))} |" if val else "")
            + f" {_fmt(row['train_acc'])} |"
        )
    if report.get("over_seeds"):
        lines += [
            "",
            f"Over seeds {', '.join(map(str, report['seeds']))} (mean +- sample sd, 95% Student-t interval):",
            "",
            "| backbone | n | probe acc (balanced) | val acc |",
            "|---|---|---|---|",
        ]
        for entry in report["over_seeds"]:
            lines.append(
                f"| {entry['template']} | {len(entry['seeds'])} | {_spread_cell(entry['acc'])} | "
                f"{_spread_cell(entry['val_acc'])} |"
            )
    return "\n".join(lines) + "\n"
