"""``compare``: several methods on identical data, partition, seeds and ranks, and one table of the results.

A method is a base strategy plus, optionally, stages of the MLLM-assisted method, written
``<strategy>[+dwp[llava]][+align[<teacher>]]``:

- a strategy name (``fedavg``, ``fedavgm``, ``fedprox``, ``creff``, ``clip2fl``, or a plugin's,
  :mod:`mllmfl_dist.config.plugins`): the strategy from a randomly initialised backbone, alignment off;
- ``+dwp[llava]``: the backbone comes from Dynamic Weighted Pretraining against the LLaVA (``[annotate]`` /
  ``[pretrain]``), run once per seed in ``<run dir>/compare/stage1/seed<k>/`` and shared by every +dwp row;
- ``+align[none|clip|llava|uniform]``: global alignment as ``[align]`` describes it (``every = 1`` where the
  config has 0), with that teacher (``none``: cross-entropy on the server's labeled images alone; ``uniform``:
  q = 1/C at the same beta, the control without a model's knowledge; ``llava`` /
  ``clip``: ``align.teacher_model`` when the config's teacher is of that kind, else ``annotate.model`` /
  a model of that kind a strategy's section names, such as ``clip2fl.model``);
- ``mllm-llava-fl``: the full method, ``fedavg+dwp[llava]+align[llava]`` (the only row called that);
- ``config``: the config as written, named by what it runs.

Every method runs for every seed in ``<run dir>/compare/<method>/seed<k>/`` through the same ``run``
pipeline, so each (method, seed) is resumable on its own and a finished one is not trained again. Rank 0
then writes the tables and the plot (:mod:`mllmfl_dist.commands.compare_table`).

With ``--tune`` (:mod:`mllmfl_dist.commands.tuning`) each method first runs its configurations on the tuning
seeds in ``<run dir>/compare/tune/<method>/<config id>/seed<k>/``; rank 0 picks one per method on validation
accuracy and writes ``<run dir>/compare/tuning.json``, and the chosen configuration runs on the reporting
seeds in ``<run dir>/compare/<method>/<config id>/seed<k>/``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mllmfl_dist.config import Config, ConfigError, validate
from mllmfl_dist.core import dist
from mllmfl_dist.fl.strategies import build_strategy, strategy_class, strategy_names
from mllmfl_dist.commands import tuning
from mllmfl_dist.commands.compare_methods import Method
from mllmfl_dist.commands.compare_table import run_row, write_results
from mllmfl_dist.commands.pipeline import run_pipeline, run_stage1
from mllmfl_dist.commands.seed_statistics import parse_seed_list
from mllmfl_dist.stages.deepspeed_setup import accumulation_steps

log = logging.getLogger(__name__)


def parse_seeds(text: str | None, cfg: Config) -> list[int]:
    return parse_seed_list(text) if text else [cfg.run.seed]


def compare_options(args: Any, cfg: Config, seeds: Sequence[int]) -> tuple[Any, tuple[int, float | None]]:
    """(TuneSpec or None, (last, target)) from compare's options; ConfigError for a bad one."""
    for name, value in (("--tune-budget", args.tune_budget), ("--tune-last", args.tune_last), ("--last", args.last)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if args.target is not None and not 0.0 < args.target <= 1.0:
        raise ConfigError(f"--target is a balanced accuracy in (0, 1], got {args.target}")
    tune = None
    if args.tune:
        tuning.check_validation(cfg)
        tune = tuning.TuneSpec(
            tuning.parse_tune(args.tune),
            args.tune_budget,
            tuning.parse_tune_seeds(args.tune_seeds, seeds),
            args.tune_last,
            cfg.run.seed,
        )
    elif args.tune_seeds:
        raise ConfigError("--tune-seeds without --tune: name the keys to tune with --tune KEY=V1,V2")
    return tune, (args.last, args.target)


def check_methods(cfg: Config, methods: list[Method], tune: tuning.TuneSpec | None) -> None:
    """Refuse a bad method, or a model one needs that is not there, for every tuned setting (ConfigError,
    ModelLoadError)."""
    for method in methods:
        for setting in tuning.method_grid(method, tune) if tune else [{}]:
            build_strategy(method_config(cfg, method, setting=setting)).projection_dim(0)  # only its refusal matters


def check_stage1_world(cfg: Config, methods: list[Method], tune: tuning.TuneSpec | None, world_size: int) -> None:
    """Refuse, before any row runs, a world size that a +dwp row's ``pretrain.global_batch_size`` does not split
    over (ConfigError): otherwise the rows before it train first and the comparison dies at its stage 1."""
    for method in methods:
        for setting in (tuning.method_grid(method, tune) if tune else [{}]) if method.dwp else []:
            accumulation_steps(method_config(cfg, method, setting=setting).pretrain, world_size)


def compare_dir(cfg: Config) -> Path:
    return cfg.paths.compare


def _teacher_model(cfg: Config, teacher: str) -> tuple[str, str]:
    """(align.teacher_model, align.clip_pretrained) for an alignment row with ``teacher``."""
    if teacher in ("none", "uniform"):  # no model: labels alone, or q = 1/C
        return "", ""
    if cfg.align.teacher == teacher and cfg.align.teacher_model:
        return cfg.align.teacher_model, cfg.align.clip_pretrained
    if teacher == "llava":
        model, pretrained, keys = cfg.annotate.model or cfg.pretrain.model, "", "annotate.model"
    else:  # a model of this kind that a strategy's section names (clip2fl.model)
        named = [
            use
            for name in strategy_names()
            for use in strategy_class(name).models(cfg.strategy_sections)
            if use.kind == teacher
        ]
        found = next((use for use in named if use.model), None)
        model, pretrained = (found.model, found.pretrained) if found else ("", "")
        keys = " or ".join(dict.fromkeys(use.key for use in named)) or f"a {teacher} model of a strategy"
    if not model:
        raise ConfigError(
            f"compare: align[{teacher}] needs a {teacher} model; set align.teacher_model (with "
            f"align.teacher = '{teacher}') or {keys}"
        )
    return model, pretrained


def method_config(
    cfg: Config,
    method: Method,
    seed: int | None = None,
    setting: Mapping[str, Any] | None = None,
    root: Path | None = None,
) -> Config:
    """The config of one (method, seed) of the comparison (see the module docstring), with ``setting``
    ({section.key: value}, a tuned configuration) applied, in ``root``/seed<k> (default: the row's folder)."""
    seed = cfg.run.seed if seed is None else seed
    setting = dict(setting or {})
    cfg = tuning.apply_setting(cfg, setting)
    root = root or row_root(cfg, method, setting)
    run = dataclasses.replace(
        cfg.run, root=str(root), name=f"seed{seed}", seed=seed, baseline=False
    )  # the fedavg row is the baseline
    backbone = str(stage1_config(cfg, seed, setting).paths.backbone) if method.dwp else ""
    if method.as_written:
        method_cfg = dataclasses.replace(
            cfg, run=run, model=dataclasses.replace(cfg.model, pretrained_backbone=backbone)
        )
    else:
        if method.teacher is None:
            align = dataclasses.replace(cfg.align, every=0)
        else:
            teacher_model, clip_pretrained = _teacher_model(cfg, method.teacher)
            align = dataclasses.replace(
                cfg.align,
                every=cfg.align.every or 1,
                teacher=method.teacher,
                teacher_model=teacher_model,
                clip_pretrained=clip_pretrained,
            )
        method_cfg = dataclasses.replace(
            cfg,
            run=run,
            align=align,
            federated=dataclasses.replace(cfg.federated, strategy=method.strategy),
            model=dataclasses.replace(cfg.model, pretrained_backbone=backbone),
        )
    for name, options in strategy_class(method.strategy).sections.items():  # a strategy registered after loading
        if name not in method_cfg.strategy_sections:
            method_cfg = method_cfg.with_section(name, options())
    if method.dwp and not (method_cfg.annotate.model or method_cfg.pretrain.model):
        raise ConfigError(
            f"compare: method {method.name} pretrains with DWP, which needs the LLaVA in "
            f"annotate.model (or pretrain.model)"
        )
    try:
        validate(method_cfg)
    except ConfigError as err:
        tuned = f" ({tuning.describe(setting)})" if setting else ""
        raise ConfigError(f"compare: method {method.name}{tuned}: {err}") from None
    return method_cfg


def row_root(cfg: Config, method: Method, setting: Mapping[str, Any] | None = None) -> Path:
    """Where a row's seeds run: ``compare/<method>/``, or ``compare/<method>/<config id>/`` for a tuned setting
    (a run directory holds one config: a different choice must not resume another's run)."""
    root = compare_dir(cfg) / method.dirname
    return root / tuning.config_id(setting) if setting else root


def tune_root(cfg: Config, method: Method, setting: Mapping[str, Any]) -> Path:
    """Where a configuration's tuning runs live: ``compare/tune/<method>/<config id>/``."""
    return compare_dir(cfg) / "tune" / method.dirname / tuning.config_id(setting)


def stage1_config(cfg: Config, seed: int, setting: Mapping[str, Any] | None = None) -> Config:
    """Stage 1 (annotation, DWP) of one seed, shared by every +dwp row of the comparison, in
    ``<run dir>/compare/stage1/seed<k>/`` (``stage1-<config id>/`` for tuned pretrain/annotate keys)."""
    part = tuning.stage1_part(setting or {})
    folder = f"stage1-{tuning.config_id(part)}" if part else "stage1"
    run = dataclasses.replace(
        cfg.run, root=str(compare_dir(cfg) / folder), name=f"seed{seed}", seed=seed, baseline=False
    )
    return dataclasses.replace(cfg, run=run, model=dataclasses.replace(cfg.model, pretrained_backbone="pretrain"))


def run_compare(
    cfg: Config,
    runtime: dist.Runtime,
    methods: list[Method],
    seeds: list[int],
    tune: tuning.TuneSpec | None = None,
    last: int = 3,
    target: float | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume, or skip when complete) every method for every seed, after its tuning runs with ``tune``,
    then write the tables and the plot on rank 0 (``last``: evaluations averaged in the last-evaluations
    column; ``target``: balanced test accuracy of the rounds-to-target column). Returns the per-(method,
    seed) rows on rank 0."""
    grids = {m.name: tuning.method_grid(m, tune) if tune else [{}] for m in methods}
    # Every config is checked before anything runs: each tuning run, and each candidate on the reporting seeds.
    tune_jobs = [
        (m, setting, s, method_config(cfg, m, s, setting, tune_root(cfg, m, setting)))
        for s in (tune.seeds if tune else ())
        for m in methods
        if len(grids[m.name]) > 1
        for setting in grids[m.name]
    ]
    candidates = {
        (m.name, tuning.config_id(setting), s): method_config(cfg, m, s, setting)
        for m in methods
        for setting in grids[m.name]
        for s in seeds
    }
    _run_jobs(cfg, runtime, tune_jobs, "tuning")
    chosen = {m.name: grids[m.name][0] for m in methods}
    if tune:
        paths = {(m.name, tuning.config_id(setting), s): job_cfg.paths.metrics for m, setting, s, job_cfg in tune_jobs}
        chosen = dist.server_decides(
            runtime,
            lambda: tuning.select_all(compare_dir(cfg), methods, grids, tune, paths),
            "the configurations chosen on validation accuracy (tuning.json)",
        )
    configs = {(m.name, s): candidates[(m.name, tuning.config_id(chosen[m.name]), s)] for s in seeds for m in methods}
    # seed by seed, so a complete table of the first seed exists early
    _run_jobs(cfg, runtime, [(m, chosen[m.name], s, configs[(m.name, s)]) for s in seeds for m in methods], "")
    rows: list[dict[str, Any]] = []
    if runtime.is_server:
        rows = [
            {
                **run_row(m, s, configs[(m.name, s)], last, target),
                "tuned": tuning.describe(chosen[m.name]) if tune else "",
                "tuned_configs": len(grids[m.name]) if tune else None,
            }
            for m in methods
            for s in seeds
        ]
        write_results(
            compare_dir(cfg),
            rows,
            {m.name: [configs[(m.name, s)].run_dir for s in seeds] for m in methods},
            cfg,
            runtime,
        )
    dist.stage_barrier(runtime, "the end of the comparison (its tables)", clients_idle=True)
    return rows


def _run_jobs(
    cfg: Config, runtime: dist.Runtime, jobs: list[tuple[Method, dict[str, Any], int, Config]], what: str
) -> None:
    """Run each (method, setting, seed, config) in order, each +dwp one after its stage 1 (annotation, DWP:
    run once per seed and stage-1 setting, shared by the +dwp rows)."""
    stage1_done: set[Path] = set()
    for done, (method, setting, seed, method_cfg) in enumerate(jobs, start=1):
        if method.dwp:
            stage1 = stage1_config(tuning.apply_setting(cfg, setting), seed, setting)
            if stage1.run_dir not in stage1_done:
                log.info("compare: stage 1 (annotation, DWP) of seed %d, shared by the +dwp rows", seed)
                run_stage1(stage1, runtime)
                stage1_done.add(stage1.run_dir)
        tuned = f" ({tuning.describe(setting)})" if setting else ""
        log.info(
            "compare: %s%d/%d: %s%s, seed %d -> %s",
            f"{what} " if what else "",
            done,
            len(jobs),
            method.name,
            tuned,
            seed,
            method_cfg.run_dir,
        )
        run_pipeline(method_cfg, runtime)
