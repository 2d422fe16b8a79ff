"""The methods ``compare`` runs: a base strategy plus, optionally, stages of the MLLM-assisted method, written
``<strategy>[+dwp[llava]][+align[<teacher>]]`` (the grammar :mod:`mllmfl_dist.commands.compare` describes), or
``mllm-llava-fl`` (the full method) or ``config`` (the config as written). ConfigError for a method that is not
one."""

from __future__ import annotations

import dataclasses
import re

from mllmfl_dist.config import AlignConfig, Config, ConfigError
from mllmfl_dist.config.fields import choices_of
from mllmfl_dist.fl.strategies import builtin_strategy_names, strategy_names

TEACHERS = choices_of(AlignConfig, "teacher")
FULL_METHOD = "mllm-llava-fl"
_SPEC = re.compile(r"^(?P<strategy>[a-z][a-z0-9_]*)(?P<dwp>\+dwp\[llava\])?(?:\+align\[(?P<teacher>[a-z]+)\])?$")


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the comparison: a base strategy, DWP or not, and the alignment teacher (None: no
    alignment). ``as_written`` marks the ``config`` method (the config's own settings, not rewritten)."""

    strategy: str
    dwp: bool = False
    teacher: str | None = None
    as_written: bool = False

    @property
    def name(self) -> str:
        if self.strategy == "fedavg" and self.dwp and self.teacher == "llava":
            return FULL_METHOD
        return self.strategy + ("+dwp[llava]" if self.dwp else "") + (f"+align[{self.teacher}]" if self.teacher else "")

    @property
    def dirname(self) -> str:
        """The name without brackets, for a directory a shell need not quote."""
        return self.name.replace("[", "-").replace("]", "")


def method_of_config(cfg: Config) -> Method:
    """The method a config runs as written."""
    if cfg.model.pretrained_backbone not in ("", "pretrain"):
        raise ConfigError(
            f"compare: the config starts from the backbone file {cfg.model.pretrained_backbone!r}; "
            f"a compare row names what ran, so use model.pretrained_backbone = 'pretrain' or ''"
        )
    return Method(
        cfg.federated.strategy,
        cfg.model.pretrained_backbone == "pretrain",
        cfg.align.teacher if cfg.align.every else None,
        as_written=True,
    )


def parse_method(text: str, cfg: Config) -> Method:
    spec = text.strip()
    if spec == "config":
        return method_of_config(cfg)
    if spec == FULL_METHOD:
        return Method("fedavg", dwp=True, teacher="llava")
    match = _SPEC.match(spec)
    names = strategy_names()
    if not match or match["strategy"] not in names or (match["teacher"] or "none") not in TEACHERS:
        raise ConfigError(
            f"compare: unknown method {spec!r}; a method is <strategy>[+dwp[llava]][+align[<teacher>]] "
            f"with strategy one of {', '.join(names)} and teacher one of "
            f"{', '.join(TEACHERS)} (e.g. fedavg, creff, fedavg+align[none], fedavg+dwp[llava]), or "
            f"{FULL_METHOD}, or config (the config as written)"
        )
    return Method(match["strategy"], bool(match["dwp"]), match["teacher"])


def parse_methods(text: str, cfg: Config) -> list[Method]:
    methods = [parse_method(m, cfg) for m in text.split(",") if m.strip()]
    if not methods:
        raise ConfigError(f"--methods {text!r} names no method")
    names = [m.name for m in methods]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"--methods {text!r} names {', '.join(twice)} twice")
    return methods


def default_methods(cfg: Config) -> str:
    """The built-in strategies, plus the config as written when it runs a stage of the method."""
    uses_method = cfg.align.every > 0 or cfg.model.pretrained_backbone == "pretrain"
    baselines = builtin_strategy_names()
    return ",".join((*baselines, "config") if uses_method else baselines)
