"""Reading a config: TOML file, ``--set section.key=value`` overrides, types, then every field's bounds and the
rules that span fields.

Everything here is driven by the schema's annotations: a table is built into its section's dataclass (unknown
sections and keys are errors), each value is checked against the field's type (an int where a float is
expected is accepted; a float must be finite), an override is parsed as the field's type (``--set
federated.lr=0.1`` is a float, ``--set data.download=true`` a bool), and the choices and bounds declared on the
fields are enforced (:func:`mllmfl_dist.config.fields.check_section`). The strategies' sections
(``[creff]``, a plugin's) go through the same steps with the strategy's dataclass.

Every problem a user can cause raises :class:`ConfigError` with a message that names the key and what is
allowed; the CLI turns it into one line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mllmfl_dist.config import plugins
from mllmfl_dist.config.fields import check_section, is_path
from mllmfl_dist.config.run_name import is_template, resolve_run_name
from mllmfl_dist.config.schema import CORE_SECTIONS, Config
from mllmfl_dist.core import preflight
from mllmfl_dist.core.errors import ConfigError
from mllmfl_dist.core.resources import resolve_path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def load_config(path: str | Path, overrides: Sequence[str] = (), *, check_run_dir: bool = True) -> Config:
    """Read a TOML file, apply ``section.key=value`` overrides, validate, and return a frozen Config.
    ``check_run_dir``: refuse a run directory that cannot be made (:func:`check_machine`); off for commands
    that only read one.
    ``configs/NAME.toml`` not found in the working directory is the shipped config
    (:mod:`mllmfl_dist.core.resources`)."""
    path = resolve_path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = read_toml(path)
    for item in overrides:
        keys, value = parse_override(item)
        table = raw
        for depth, key in enumerate(keys[:-1]):
            table = table.setdefault(key, {})
            if not isinstance(table, dict):
                raise ConfigError(f"[{'.'.join(keys[: depth + 1])}] must be a table")
        table[keys[-1]] = value
    raw.setdefault("run", {})
    if isinstance(raw["run"], dict) and not raw["run"].get("name"):
        raw["run"]["name"] = path.stem
    config = config_from_dict(raw)
    check_machine(config, check_run_dir)
    return config


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML file at ``path`` as a dict; a UTF-8 byte-order mark (which some editors write) is skipped.
    ConfigError naming the file for text that is not UTF-8 or not TOML."""
    try:
        table: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8-sig"))
        return table
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None


def check_machine(config: Config, check_run_dir: bool = True) -> None:
    """What a config asks of this machine, before anything is written: a run directory that can be made
    (:func:`preflight.check_run_dir`) and data that fits its memory on each of the node's ranks."""
    if check_run_dir:
        preflight.check_run_dir(config.run.root, config.run.name)
    preflight.check_data_memory(
        config.data, config.federated.num_clients, preflight.physical_memory_bytes(), preflight.local_world_size()
    )


def section_types() -> dict[str, type]:
    """Every section a config may hold and its dataclass: the run's own, then the strategies'."""
    hints = typing.get_type_hints(Config)
    return {**{name: hints[name] for name in CORE_SECTIONS}, **plugins.strategy_sections()}


def config_from_dict(raw: dict[str, Any]) -> Config:
    types = section_types()
    core: dict[str, Any] = {}
    strategies: dict[str, Any] = {}
    for name, values in raw.items():
        if name not in types:
            raise ConfigError(f"unknown section [{name}]; allowed: {', '.join(types)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] must be a table of keys")
        (core if name in CORE_SECTIONS else strategies)[name] = _build(types[name], values, f"{name}.")
    sections = {name: strategies.get(name) or types[name]() for name in types if name not in CORE_SECTIONS}
    config = Config(**core, strategy_sections=sections)
    if is_template(config.run.name):  # "{federated.strategy}-s{run.seed}": resolved after every override
        name = resolve_run_name(config.run.name, flat_items(config.to_dict()))
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, name=name))
    validate(config)
    return config


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a TOML table, recursing into nested tables."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"unknown key {name}; allowed: {', '.join(hints)}")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"[{name}] must be a table of keys")
            kwargs[key] = _build(hints[key], value, f"{name}.")
        else:
            kwargs[key] = _check_type(name, hints[key], value)
            if is_path(cls, key):
                kwargs[key] = preflight.expand_user(kwargs[key])
    return cls(**kwargs)


def _check_type(name: str, expected: type[Any], value: Any) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    wrong_bool = expected is not bool and isinstance(value, bool)
    if wrong_bool or not isinstance(value, expected):
        raise ConfigError(f"{name} must be {_type_name(expected)}, got {value!r}")
    if expected is int and not INT64_MIN <= value <= INT64_MAX:  # TOML's range; --set parses any length
        raise ConfigError(f"{name} = {value} is not allowed; it must fit a 64-bit integer (at most {INT64_MAX})")
    return value


def _type_name(tp: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def parse_override(item: str) -> tuple[list[str], Any]:
    """``section.key=value`` (or ``section.table.key=value``) -> (keys, typed value)."""
    name, sep, text = item.partition("=")
    keys = name.strip().split(".")
    if not sep or len(keys) < 2 or not all(keys):
        raise ConfigError(f"--set expects section.key=value, got {item!r}")
    types = section_types()
    if keys[0] not in types:
        raise ConfigError(f"unknown section [{keys[0]}] in --set {item!r}; allowed: {', '.join(types)}")
    cls: type = types[keys[0]]
    parent = cls
    for depth, key in enumerate(keys[1:], start=1):
        hints = typing.get_type_hints(cls)
        if key not in hints:
            raise ConfigError(
                f"unknown key {'.'.join(keys[: depth + 1])} in --set {item!r}; allowed: {', '.join(hints)}"
            )
        parent, cls = cls, hints[key]
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"--set {item!r} names a table; set one of its keys")
    # Checked and expanded here as well as in _build, so callers that bypass the TOML tree (compare --tune) get
    # the same value a config file would give.
    value = _check_type(name.strip(), cls, _parse_value(name.strip(), cls, text.strip()))
    return keys, preflight.expand_user(value) if is_path(parent, keys[-1]) else value


def _parse_value(name: str, tp: type, text: str) -> Any:
    if tp is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"{name} must be true or false, got {text!r}")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ConfigError(f"{name} must be {_type_name(tp)}, got {text!r}") from None
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return text


def flat_items(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1, "c": {"d": 2}}}`` -> ``{"a.b": 1, "a.c.d": 2}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_items(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def validate(config: Config) -> None:
    """Every field's choices and bounds, then the rules that span fields, then the strategy's own check."""
    for name in CORE_SECTIONS:
        check_section(f"{name}.", getattr(config, name))
    for name, values in config.strategy_sections.items():
        check_section(f"{name}.", values)
    fed = config.federated
    strategy: Any = plugins.strategy_class(fed.strategy)  # an unknown name: the names there are
    if fed.clients_per_round > fed.num_clients:
        raise ConfigError(
            f"federated.clients_per_round = {fed.clients_per_round} is not allowed; it must be <= "
            f"federated.num_clients ({fed.num_clients})"
        )
    if config.data.source != "synthetic" and config.data.synthetic_mode != "array":
        raise ConfigError("data.synthetic_mode = 'on_demand' is only allowed with data.source = 'synthetic'")
    part = config.partition
    if config.data.synthetic_mode == "on_demand" and (
        part.method == "shards" or part.self_balancing or part.min_partition_size
    ):
        # On-demand clients draw their own label mix; there is no whole training set to cut.
        raise ConfigError(
            "data.synthetic_mode = 'on_demand' supports partition.method dirichlet, creff or iid "
            "without partition.self_balancing or partition.min_partition_size"
        )
    pre = config.pretrain
    if pre.global_batch_size and pre.global_batch_size % pre.micro_batch_size:
        raise ConfigError(
            f"pretrain.global_batch_size = {pre.global_batch_size} is not a multiple of pretrain.micro_batch_size "
            f"({pre.micro_batch_size})"
        )
    if pre.global_batch_size and pre.deepspeed.gradient_accumulation_steps != 1:
        raise ConfigError(
            "pretrain.global_batch_size and pretrain.deepspeed.gradient_accumulation_steps are both set; set one "
            "(with global_batch_size the accumulation steps follow from it and the number of processes)"
        )
    if config.dp.enabled:
        strategy.check_dp(config)  # the strategy layer's check, reached through the registry (config imports no fl)
    if config.federated.vectorize > 1:
        strategy.check_vectorize(config)
    strategy.check_config(config)
