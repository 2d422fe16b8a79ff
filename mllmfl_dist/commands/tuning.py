"""``compare --tune KEY=v1,v2,...``: a small hyperparameter grid per method, chosen on validation accuracy.

Each method reads only some keys (:func:`reads`): the common federated keys every strategy reads
(:data:`EVERY_STRATEGY`), ``federated.server_momentum`` only FedAvgM, ``federated.prox_mu`` only FedProx, a
strategy section's keys (``creff.*``, ``clip2fl.*``) only the strategies declaring that section,
``align.*`` only +align rows and ``pretrain.*`` / ``annotate.*`` only +dwp rows. A method's grid is the
product of the values of the keys it reads; it tries all of it when that is at most ``budget``
configurations, else a sample of ``budget`` of them drawn with ``random.Random(sample_seed)`` (the same draw
for methods with the same grid), kept in grid order.

Selection (:func:`select_config`): a configuration's score is the mean of ``val_acc`` (balanced accuracy on
the validation split, ``data.val_per_class``) over the last ``last`` evaluations of a run, averaged over the
tuning seeds; the highest score wins, a tie goes to the configuration earlier in grid order. Test accuracy is
never looked at. The tuning seeds default to :data:`DEFAULT_TUNE_SEEDS` (the first two seeds from 100 on
that are not reporting seeds), so the reporting runs are not the runs the choice was made on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import random
import re
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mllmfl_dist.config import Config, ConfigError, plugins
from mllmfl_dist.config.loader import parse_override
from mllmfl_dist.commands.seed_statistics import last_mean
from mllmfl_dist.core.checkpoint import write_text_atomic
from mllmfl_dist.core.jsonl import read_evaluations

# Keys every strategy reads (its local training and its server step).
EVERY_STRATEGY = (
    "federated.lr",
    "federated.momentum",
    "federated.weight_decay",
    "federated.local_epochs",
    "federated.batch_size",
    "federated.server_lr",
)
ONE_STRATEGY = {"federated.server_momentum": "fedavgm", "federated.prox_mu": "fedprox"}
# Keys of a strategy section that some strategies declaring it do not read (FedAdagrad has no second-moment decay),
# so a grid over them would give those strategies duplicate configurations.
NOT_READ_BY = {"fedopt.beta2": ("fedadagrad",)}
# A row's name sets these (align[<teacher>] picks the teacher and its model), so a grid over them would be
# overwritten.
ROW_SETS = ("align.teacher", "align.teacher_model", "align.clip_pretrained")
STAGE1_SECTIONS = ("pretrain", "annotate")
# align keys only some teachers read: a grid over them would give a row that ignores them duplicate configurations
TEACHER_KEYS = {
    "align.beta": ("llava", "clip", "uniform"),
    "align.temperature": ("llava", "clip", "uniform"),
    "align.teacher_temperature": ("llava", "clip"),
    "align.teacher_score": ("llava",),
    "align.prompt": ("llava",),
    "align.templates": ("clip",),
    "align.clip_logit_scale": ("clip",),
}
DEFAULT_TUNE_SEEDS = (100, 101)
VAL_KEY = "val_acc"

Setting = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TuneSpec:
    """What ``--tune`` asks for: ``grid`` {key: values in the order given}, at most ``budget`` configurations a
    method, each run on ``seeds`` and scored on the mean ``val_acc`` of its last ``last`` evaluations."""

    grid: Mapping[str, tuple[Any, ...]]
    budget: int = 3
    seeds: tuple[int, ...] = DEFAULT_TUNE_SEEDS
    last: int = 3
    sample_seed: int = 0


def _tunable(key: str) -> bool:
    section = key.split(".", 1)[0]
    return (
        key in EVERY_STRATEGY
        or key in ONE_STRATEGY
        or section in ("align", *STAGE1_SECTIONS)
        or section in plugins.strategy_sections()
    )


def parse_tune(texts: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """``["federated.lr=0.01,0.05", ...]`` -> ``{"federated.lr": (0.01, 0.05), ...}``, each value typed as the
    field (as ``--set`` types it). ConfigError for an unknown or untunable key, a key given twice, no value
    or a value given twice."""
    grid: dict[str, tuple[Any, ...]] = {}
    for text in texts:
        key, sep, values_text = text.partition("=")
        key = key.strip()
        texts_of_values = [v.strip() for v in values_text.split(",") if v.strip()]
        if not sep or not texts_of_values:
            raise ConfigError(f"--tune expects section.key=v1,v2,..., got {text!r}")
        if key in grid:
            raise ConfigError(f"--tune names {key} twice")
        if key in ROW_SETS:
            raise ConfigError(f"--tune {key}: the row's name sets it (align[<teacher>]); tune other align keys")
        try:
            values = tuple(parse_override(f"{key}={v}")[1] for v in texts_of_values)
        except ConfigError as err:
            raise ConfigError(f"--tune {text!r}: {err}") from None
        if not _tunable(key):
            raise ConfigError(
                f"--tune {key}: compare tunes {', '.join(EVERY_STRATEGY)}, federated.server_momentum "
                f"(fedavgm), federated.prox_mu (fedprox), a strategy's section "
                f"({', '.join(f'{s}.*' for s in plugins.strategy_sections())}), align.* (+align rows) "
                f"and pretrain.* / annotate.* (+dwp rows)"
            )
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"--tune {text!r} names a value twice")
        grid[key] = values
    return grid


def parse_tune_seeds(text: str | None, reporting: Sequence[int]) -> tuple[int, ...]:
    """``--tune-seeds`` (distinct non-negative integers, none a reporting seed), or by default the first two
    seeds from 100 on that are not reporting seeds."""
    if not text:
        return tuple(
            itertools.islice(
                (s for s in itertools.count(DEFAULT_TUNE_SEEDS[0]) if s not in reporting), len(DEFAULT_TUNE_SEEDS)
            )
        )
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        seeds = ()
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--tune-seeds {text!r}: expected distinct non-negative integers separated by commas")
    shared = sorted(set(seeds) & set(reporting))
    if shared:
        raise ConfigError(
            f"--tune-seeds {text!r}: seed(s) {', '.join(map(str, shared))} are also reporting seeds "
            f"(--seeds); a choice made on a seed would then be reported on it"
        )
    return seeds


def reads(method: Any, key: str) -> bool:
    """Whether ``method`` (a compare Method: strategy, dwp, teacher) reads ``key``."""
    section = key.split(".", 1)[0]
    if key in EVERY_STRATEGY:
        return True
    if key in ONE_STRATEGY:
        return method.strategy == ONE_STRATEGY[key]
    if section == "align":
        return method.teacher is not None and method.teacher in TEACHER_KEYS.get(key, (method.teacher,))
    if section in STAGE1_SECTIONS:
        return method.dwp
    if method.strategy in NOT_READ_BY.get(key, ()):
        return False
    return section in plugins.strategy_class(method.strategy).sections


def method_grid(method: Any, spec: TuneSpec) -> list[Setting]:
    """The configurations ``method`` tries: its grid (keys it reads), or a seeded sample of ``spec.budget`` of
    them in grid order; ``[{}]`` when it reads none of the keys."""
    keys = [k for k in spec.grid if reads(method, k)]
    grid = [dict(zip(keys, combo)) for combo in itertools.product(*(spec.grid[k] for k in keys))]
    if len(grid) <= spec.budget:
        return grid
    return [grid[i] for i in sorted(random.Random(spec.sample_seed).sample(range(len(grid)), spec.budget))]


def config_id(setting: Mapping[str, Any]) -> str:
    """A directory name for ``setting``, stable across runs: the values (readable) and a hash of the exact
    key/value pairs (``lr0.05_momentum0.9-1a2b3c4d``); ``default`` for no setting."""
    if not setting:
        return "default"
    items = sorted(setting.items())
    digest = hashlib.sha1(json.dumps(items).encode()).hexdigest()[:8]
    readable = re.sub(r"[^A-Za-z0-9.+-]", "", "_".join(f"{k.rsplit('.', 1)[-1]}{v}" for k, v in items))[:48]
    return f"{readable}-{digest}"


def stage1_part(setting: Mapping[str, Any]) -> Setting:
    """The keys of ``setting`` that shape stage 1 (annotation, DWP)."""
    return {k: v for k, v in setting.items() if k.split(".", 1)[0] in STAGE1_SECTIONS}


def describe(setting: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items())


def _replace_nested(obj: Any, names: Sequence[str], value: Any) -> Any:
    if len(names) == 1:
        return dataclasses.replace(obj, **{names[0]: value})
    return dataclasses.replace(obj, **{names[0]: _replace_nested(getattr(obj, names[0]), names[1:], value)})


def apply_setting(cfg: Config, setting: Mapping[str, Any]) -> Config:
    """``cfg`` with every ``section.key`` of ``setting`` set (unchecked: validate the result)."""
    for key, value in setting.items():
        section, *names = key.split(".")
        if section in cfg.strategy_sections:
            cfg = cfg.with_section(section, _replace_nested(cfg.strategy_sections[section], names, value))
        else:
            cfg = dataclasses.replace(cfg, **{section: _replace_nested(getattr(cfg, section), names, value)})
    return cfg


def val_score(evaluations: Sequence[Mapping[str, Any]], last: int, where: Path | str) -> float:
    """The mean ``val_acc`` over the last ``last`` evaluations of one run. ConfigError when the run has no
    evaluation or its records carry no validation accuracy (no validation split)."""
    if not evaluations:
        raise ConfigError(f"compare --tune: {where} holds no evaluation to select on")
    score = last_mean(evaluations, VAL_KEY, last)
    if score is None:
        raise ConfigError(
            f"compare --tune selects on validation accuracy, but {where} has no {VAL_KEY}: set "
            f"data.val_per_class > 0 (a validation split carved from the training split)"
        )
    return score


def select_config(
    settings: Sequence[Mapping[str, Any]],
    evaluations: Sequence[Mapping[int, Sequence[dict]]],
    last: int,
    where: Sequence[Mapping[int, Path]] | None = None,
) -> dict[str, Any]:
    """The choice among ``settings`` (grid order) given, per setting, ``{tuning seed: its evaluation
    records}``: the highest mean over seeds of :func:`val_score`, the earliest on a tie. Returns the
    ``tuning.json`` entry of one method: every configuration's id, values, per-seed and mean val scores, and
    the chosen one's index, id and values."""
    configs = []
    for i, (setting, by_seed) in enumerate(zip(settings, evaluations)):
        scores = {
            seed: val_score(records, last, where[i][seed] if where else f"configuration {i}, seed {seed}")
            for seed, records in by_seed.items()
        }
        configs.append(
            {
                "id": config_id(setting),
                "values": dict(setting),
                "val_by_seed": scores,
                "val_mean": statistics.fmean(scores.values()),
            }
        )
    best = max(range(len(configs)), key=lambda i: (configs[i]["val_mean"], -i))
    return {
        "configs": configs,
        "chosen_index": best,
        "chosen": configs[best]["id"],
        "chosen_values": configs[best]["values"],
    }


def check_validation(cfg: Config) -> None:
    """Refuse ``--tune`` before anything runs when the config has no validation split to select on."""
    if getattr(cfg.data, "val_per_class", None) == 0:
        raise ConfigError(
            "compare --tune selects on validation accuracy and the config has no validation split: "
            "set data.val_per_class > 0"
        )


def select_all(
    out_dir: Path,
    methods: Sequence[Any],
    grids: Mapping[str, Sequence[Setting]],
    spec: TuneSpec,
    metrics: Mapping[tuple[str, str, int], Path],
) -> dict[str, Setting]:
    """Choose every method's configuration from its tuning runs' ``metrics.jsonl`` (``metrics``: (method name,
    config id, tuning seed) -> path; a method with one configuration has no tuning runs and keeps it), write
    ``out_dir/tuning.json`` and return {method name: chosen setting}."""
    entries, chosen = {}, {}
    for method in methods:
        settings = grids[method.name]
        keys = [k for k in spec.grid if reads(method, k)]
        entry: dict[str, Any] = {
            "keys": keys,
            "grid_size": math.prod(len(spec.grid[k]) for k in keys),
            "tried": len(settings),
        }
        if len(settings) == 1:
            entry.update(
                {
                    "configs": [{"id": config_id(settings[0]), "values": settings[0]}],
                    "chosen_index": 0,
                    "chosen": config_id(settings[0]),
                    "chosen_values": settings[0],
                    "note": "one configuration: nothing to select, no tuning runs",
                }
            )
        else:
            where = [{s: metrics[(method.name, config_id(setting), s)] for s in spec.seeds} for setting in settings]
            evaluations = [{s: read_evaluations(path) for s, path in by_seed.items()} for by_seed in where]
            entry.update(select_config(settings, evaluations, spec.last, where))
        entries[method.name] = entry
        chosen[method.name] = dict(settings[entry["chosen_index"]])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        out_dir / "tuning.json",
        json.dumps(
            {
                "selection": f"highest mean {VAL_KEY} (balanced accuracy on the validation split) over the last "
                f"{spec.last} evaluations, averaged over the tuning seeds; a tie goes to the earlier configuration",
                "tune_seeds": list(spec.seeds),
                "last": spec.last,
                "budget": spec.budget,
                "sample_seed": spec.sample_seed,
                "grid": {k: list(v) for k, v in spec.grid.items()},
                "methods": entries,
            },
            indent=2,
        )
        + "\n",
    )
    return chosen
