"""``run.name`` as a template over config values, for sweeps.

``name = "{federated.strategy}-a{partition.alpha}-s{run.seed}"`` becomes ``fedavg-a0.5-s0``: each field is a
``section.key`` (``section.table.key`` for ``[pretrain.deepspeed]``) of the resolved config, after the file's
defaults and every ``--set`` override, formatted with Python's format spec (``{partition.alpha:.2f}``).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping
from typing import Any

from mllmfl_dist.core.errors import ConfigError

_CONVERSIONS: dict[str, Callable[[Any], str]] = {"s": str, "r": repr, "a": ascii}


def is_template(name: str) -> bool:
    return "{" in name or "}" in name


def resolve_run_name(template: str, values: Mapping[str, Any]) -> str:
    """``template`` with each ``{section.key[:spec]}`` replaced by ``values[section.key]`` (the flat config).

    Raises ConfigError naming the field for an unknown key, ``run.name`` itself, a bad format spec or an
    unbalanced brace."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ConfigError(
            f"run.name = {template!r} is not a valid template ({err}); write fields as "
            "{section.key} and a literal brace as {{ or }}"
        ) from None
    out = []
    for literal, field, spec, conversion in parts:
        out.append(literal)
        if field is None:
            continue
        if field == "run.name" or field not in values:
            known = ", ".join(k for k in ("federated.strategy", "partition.alpha", "run.seed") if k in values)
            raise ConfigError(
                f"run.name = {template!r}: {{{field}}} is not a config key it can use; fields are "
                f"section.key names of the config, e.g. {known}"
            )
        value = values[field]
        if conversion:
            value = _CONVERSIONS[conversion](value)
        try:
            out.append(format(value, spec or ""))
        except (ValueError, TypeError) as err:
            raise ConfigError(
                f"run.name = {template!r}: cannot format {{{field}}} = {value!r} with {spec!r} ({err})"
            ) from None
    return "".join(out)
