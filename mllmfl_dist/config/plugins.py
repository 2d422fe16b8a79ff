"""The plug-in point for federated strategies: one registry of names that the config, the round loop and
``compare`` all read.

A strategy is a subclass of :class:`mllmfl_dist.fl.strategies.Strategy` with a ``name`` and, optionally,
``sections``: the config sections it reads, each a frozen dataclass (``{"fedavg_clip": FedAvgClipOptions}``).
Three sources make the registry, looked up in this order:

1. the built-in strategies (:data:`BUILTIN_STRATEGIES`, imported on first use);
2. classes passed to :func:`register_strategy` (a script, a notebook, a test);
3. the entry points of the group :data:`ENTRY_POINT_GROUP` of every installed distribution, loaded on first
   use, so that a researcher's own package adds a method without editing this one::

       [project.entry-points."mllmfl_dist.strategies"]
       fedavg_clip = "fedavg_clip:FedAvgClip"

The config loader asks here for the strategy names (``federated.strategy``'s choices) and for the sections
they bring (parsed and checked like ours, written to ``config.toml`` and compared on resume). This module
imports nothing but the standard library, so importing it costs nothing; the classes it returns are loaded
when first asked for.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import re
from typing import Any

from mllmfl_dist.core.errors import ConfigError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "mllmfl_dist.strategies"
# The built-in strategies, by the same "module:attribute" form an entry point uses.
BUILTIN_STRATEGIES = {
    "fedavg": "mllmfl_dist.fl.strategies.fedavg:FedAvg",
    "fedavgm": "mllmfl_dist.fl.strategies.fedavg:FedAvgM",
    "fedprox": "mllmfl_dist.fl.strategies.fedavg:FedProx",
    "creff": "mllmfl_dist.fl.strategies.creff:CReFF",
    "clip2fl": "mllmfl_dist.fl.strategies.clip2fl:CLIP2FL",
    "fedadagrad": "mllmfl_dist.fl.strategies.fedopt:FedAdagrad",
    "fedadam": "mllmfl_dist.fl.strategies.fedopt:FedAdam",
    "fedyogi": "mllmfl_dist.fl.strategies.fedopt:FedYogi",
    "scaffold": "mllmfl_dist.fl.strategies.scaffold:Scaffold",
    "feddyn": "mllmfl_dist.fl.strategies.feddyn:FedDyn",
    "fednova": "mllmfl_dist.fl.strategies.fednova:FedNova",
}
# Their config sections, by the same form: a torch-free module, so that a config loads and is checked without
# importing the strategies (the classes declare the same dataclasses in ``sections``).
BUILTIN_SECTIONS = {
    "creff": "mllmfl_dist.config.strategy_sections:CreffConfig",
    "clip2fl": "mllmfl_dist.config.strategy_sections:Clip2flConfig",
    "fedopt": "mllmfl_dist.config.strategy_sections:FedOptConfig",
    "feddyn": "mllmfl_dist.config.strategy_sections:FedDynConfig",
}
NAME = re.compile(r"[a-z][a-z0-9_]*")
# Section names a strategy may not claim: the run's own sections (config/schema.py keeps them in step).
RESERVED_SECTIONS = frozenset(
    {
        "run",
        "dist",
        "data",
        "partition",
        "model",
        "federated",
        "eval",
        "checkpoint",
        "log",
        "annotate",
        "pretrain",
        "align",
        "dp",
    }
)

_classes: dict[str, type] = {}  # every strategy loaded or registered so far, by name
_broken: dict[str, str] = {}  # entry points that failed to load: name -> why
_entry_points_read = False


def register_strategy(cls: type) -> type:
    """Make ``cls`` (a Strategy subclass with a ``name``) available to configs, ``federate`` and ``compare``;
    returns it, so it works as a class decorator. Registering another class under a taken name, or a section
    another strategy declares with a different dataclass, is a ConfigError."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(
            f"strategy {cls.__module__}.{cls.__qualname__}: its name must be lowercase letters, "
            f"digits and '_' (starting with a letter), got {name!r}"
        )
    known = _classes.get(name)
    if known is not None and known is not cls:
        raise ConfigError(
            f"strategy name {name!r} is taken by {known.__module__}.{known.__qualname__}; give "
            f"{cls.__module__}.{cls.__qualname__} another name"
        )
    if name in BUILTIN_STRATEGIES and known is None and _path(cls) != BUILTIN_STRATEGIES[name]:
        raise ConfigError(f"strategy name {name!r} is a built-in strategy's; give {cls.__qualname__} another name")
    sections = dict(getattr(cls, "sections", {}) or {})
    for section, options in sections.items():
        if section in RESERVED_SECTIONS or not NAME.fullmatch(section):
            raise ConfigError(
                f"strategy {name!r}: section [{section}] is not a name it can use (one of the run's "
                f"own sections, or not lowercase letters, digits and '_')"
            )
        builtin = BUILTIN_SECTIONS.get(section)
        if builtin is not None and _load(builtin) is not options:
            raise ConfigError(
                f"strategy {name!r} declares section [{section}] with {options.__qualname__}, but "
                f"the built-in strategies declare it with {builtin}"
            )
        for other in _classes.values():
            theirs = (getattr(other, "sections", {}) or {}).get(section)
            if theirs is not None and theirs is not options:
                raise ConfigError(
                    f"strategy {name!r} declares section [{section}] with {options.__qualname__}, "
                    f"but {other.name!r} declares it with {theirs.__qualname__}"
                )
    _classes[name] = cls
    return cls


def unregister_strategy(name: str) -> None:
    """Forget a strategy :func:`register_strategy` added (tests); built-in ones come back on next use."""
    _classes.pop(name, None)


def strategy_class(name: str) -> type:
    """The class registered as ``name``; ConfigError listing the names there are when none is."""
    if name not in _classes and name in BUILTIN_STRATEGIES:
        register_strategy(_load(BUILTIN_STRATEGIES[name]))
    if name not in _classes:
        _read_entry_points()
    if name in _broken:
        raise ConfigError(
            f"federated.strategy = {name!r}: its plugin (entry point {name!r} of group "
            f"{ENTRY_POINT_GROUP}) cannot be loaded: {_broken[name]}"
        )
    if name not in _classes:
        raise ConfigError(f"federated.strategy = {name!r} is not allowed; choose one of: {', '.join(strategy_names())}")
    return _classes[name]


def builtin_strategy_names() -> tuple[str, ...]:
    return tuple(BUILTIN_STRATEGIES)


def strategy_names() -> tuple[str, ...]:
    """Every strategy there is: the built-in ones, then registered ones and plugins, in the order they came."""
    for name in BUILTIN_STRATEGIES:
        strategy_class(name)
    _read_entry_points()
    return tuple(_classes)


def strategy_sections() -> dict[str, type]:
    """``{section: dataclass}`` of the config sections every known strategy reads: the built-in ones (without
    importing the strategies, so without torch), then those of registered strategies and plugins (a section
    two strategies read, such as ``[creff]``, once)."""
    sections: dict[str, type] = {name: _load(path) for name, path in BUILTIN_SECTIONS.items()}
    _read_entry_points()
    for cls in list(_classes.values()):
        sections.update({k: v for k, v in (getattr(cls, "sections", {}) or {}).items() if k not in sections})
    return sections


def _path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _load(path: str) -> Any:
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _read_entry_points() -> None:
    global _entry_points_read
    if _entry_points_read:
        return
    _entry_points_read = True
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in _classes or entry.name in BUILTIN_STRATEGIES:
            continue
        try:
            cls = entry.load()
            if getattr(cls, "name", None) != entry.name:
                raise ConfigError(f"{entry.value} is named {getattr(cls, 'name', None)!r}, not {entry.name!r}")
            register_strategy(cls)
        except Exception as err:  # noqa: BLE001 - a broken plugin must not stop runs that do not use it
            _broken[entry.name] = f"{type(err).__name__}: {err}"
            log.warning("strategy plugin %r (%s) cannot be loaded: %s", entry.name, entry.value, _broken[entry.name])
