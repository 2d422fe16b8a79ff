"""Config fields that carry what they allow: the schema states each key's choices or bounds where the key is
declared, and one check (:func:`check_section`) enforces them for every section, ours and a strategy
plugin's alike.

A field is a dataclass field with a default and, in its metadata, either ``choices`` (a tuple of allowed
values) or ``check`` (a predicate and the words for what it allows)::

    @dataclass(frozen=True)
    class MyStrategyOptions:
        max_norm: float = positive(1.0)
        mode: str = choice("clip", ("clip", "scale"))
        rounds_between: int = at_least(1, 1)
        note: str = ""  # no metadata: the type alone is checked

Types are checked by the loader from the annotations (:mod:`mllmfl_dist.config.loader`); a float must also
be finite. A failed check is one :class:`ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from mllmfl_dist.core.errors import ConfigError

CHOICES = "choices"
CHECK = "check"

Predicate = Callable[[Any], bool]


def choice(default: Any, choices: tuple[Any, ...]) -> Any:
    """A field whose value must be one of ``choices``."""
    if default not in choices:
        raise ValueError(f"default {default!r} is not one of {choices}")
    return dataclasses.field(default=default, metadata={CHOICES: tuple(choices)})


def checked(default: Any, predicate: Predicate, allowed: str) -> Any:
    """A field whose value must satisfy ``predicate``; ``allowed`` says what that means (after "it must be")."""
    return dataclasses.field(default=default, metadata={CHECK: (predicate, allowed)})


def at_least(default: int, low: int) -> Any:
    return checked(default, lambda v: v >= low, f"an integer >= {low}")


def positive(default: float) -> Any:
    return checked(default, lambda v: v > 0, "a number > 0")


def non_negative(default: float, allowed: str = "a number >= 0") -> Any:
    return checked(default, lambda v: v >= 0, allowed)


def fraction(default: float) -> Any:
    """A number in [0, 1) (momentum)."""
    return checked(default, lambda v: 0 <= v < 1, "a number in [0, 1)")


def unit_interval(default: float) -> Any:
    """A number in (0, 1]."""
    return checked(default, lambda v: 0 < v <= 1, "a number in (0, 1]")


def image_prompt(default: str) -> Any:
    """A prompt sent with an image: LLaVA's processor puts its visual tokens where ``<image>`` stands, and fails
    only after the model has loaded when it is missing or doubled."""
    return checked(default, lambda v: v.count("<image>") == 1,
                   "a prompt holding <image> exactly once (where the image's tokens go), e.g. "
                   "'USER: <image>\\nDescribe the image. ASSISTANT:'")


def check_section(prefix: str, values: Any) -> None:
    """Raise ConfigError for the first field of the dataclass instance ``values`` (the section ``prefix``, e.g.
    ``"federated."``) whose value its metadata does not allow; nested dataclasses are checked too."""
    for spec in dataclasses.fields(values):
        key, value = f"{prefix}{spec.name}", getattr(values, spec.name)
        if dataclasses.is_dataclass(value):
            check_section(f"{key}.", value)
            continue
        if CHOICES in spec.metadata and value not in spec.metadata[CHOICES]:
            raise ConfigError(f"{key} = {value!r} is not allowed; choose one of: "
                              f"{', '.join(map(str, spec.metadata[CHOICES]))}")
        if CHECK in spec.metadata:
            predicate, allowed = spec.metadata[CHECK]
            if not predicate(value):
                raise ConfigError(f"{key} = {value!r} is not allowed; it must be {allowed}")


def choices_of(section: type, name: str) -> tuple[Any, ...]:
    """The choices a field declares (``choices_of(AlignConfig, "teacher")``)."""
    spec = next(f for f in dataclasses.fields(section) if f.name == name)
    return spec.metadata[CHOICES]
