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
be finite, and every float must fit float32 (what training computes in), so a value that is finite in the
TOML but infinite or zero on the tensors is refused here rather than as NaNs later. A field declared with
:func:`path` is a file system path: the loader expands a leading ``~`` (also after ``local-dir:`` and
``file:``), and control characters or over-long names in it are refused. A failed check is one
:class:`ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from mllmfl_dist.core import preflight
from mllmfl_dist.core.errors import ConfigError

CHOICES = "choices"
CHECK = "check"
PATH = "path"

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


# Waits become datetime.timedelta, which overflows near 1.4e12 minutes, and torch's int64 milliseconds; 1e8
# minutes (190 years) is longer than any job and far from both.
MAX_MINUTES = 1e8


def minutes(default: float) -> Any:
    """A positive duration in minutes, at most :data:`MAX_MINUTES`."""
    return checked(default, lambda v: 0 < v <= MAX_MINUTES, f"a number of minutes in (0, {MAX_MINUTES:g}]")


def fraction(default: float) -> Any:
    """A number in [0, 1) (momentum)."""
    return checked(default, lambda v: 0 <= v < 1, "a number in [0, 1)")


def unit_interval(default: float) -> Any:
    """A number in (0, 1]."""
    return checked(default, lambda v: 0 < v <= 1, "a number in (0, 1]")


def image_prompt(default: str) -> Any:
    """A prompt sent with an image: LLaVA's processor puts its visual tokens where ``<image>`` stands, and fails
    only after the model has loaded when it is missing or doubled."""
    return checked(
        default,
        lambda v: v.count("<image>") == 1,
        "a prompt holding <image> exactly once (where the image's tokens go), e.g. "
        "'USER: <image>\\nDescribe the image. ASSISTANT:'",
    )


def check_section(prefix: str, values: Any) -> None:
    """Raise ConfigError for the first field of the dataclass instance ``values`` (the section ``prefix``, e.g.
    ``"federated."``) whose value its metadata does not allow; nested dataclasses are checked too."""
    for spec in dataclasses.fields(values):
        key, value = f"{prefix}{spec.name}", getattr(values, spec.name)
        if dataclasses.is_dataclass(value):
            check_section(f"{key}.", value)
            continue
        if isinstance(value, float) and (problem := float32_problem(value)):
            raise ConfigError(f"{key} = {value!r} is not allowed; {problem}")
        if spec.metadata.get(PATH) and (problem := preflight.path_text_problem(value)):
            raise ConfigError(f"{key} = {value!r} is not allowed; {problem}")
        if CHOICES in spec.metadata and value not in spec.metadata[CHOICES]:
            raise ConfigError(
                f"{key} = {value!r} is not allowed; choose one of: {', '.join(map(str, spec.metadata[CHOICES]))}"
            )
        if CHECK in spec.metadata:
            predicate, allowed = spec.metadata[CHECK]
            if not predicate(value):
                raise ConfigError(f"{key} = {value!r} is not allowed; it must be {allowed}")


def path_setting(default: str = "") -> Any:
    """A file system path (or a pattern, a hub id or a URI that may hold one): ``~`` is expanded at load."""
    return dataclasses.field(default=default, metadata={PATH: True})


def is_path(section: type, name: str) -> bool:
    return any(f.name == name and f.metadata.get(PATH) for f in dataclasses.fields(section))


def float32_problem(value: float) -> str | None:
    """Why ``value`` does not survive conversion to float32 (it overflows to inf, or a non-zero value flushes
    to 0), or None."""
    magnitude = abs(value)
    if magnitude > preflight.FLOAT32_MAX:
        return f"it overflows float32 (largest {preflight.FLOAT32_MAX:.4g}), the precision training runs in"
    if 0 < magnitude < preflight.FLOAT32_TINY:
        return (
            f"it is below float32's smallest normal number ({preflight.FLOAT32_TINY:.4g}), the precision "
            f"training runs in; use 0 or a larger value"
        )
    return None


def choices_of(section: type, name: str) -> tuple[Any, ...]:
    """The choices a field declares (``choices_of(AlignConfig, "teacher")``)."""
    spec = next(f for f in dataclasses.fields(section) if f.name == name)
    choices: tuple[Any, ...] = spec.metadata[CHOICES]
    return choices
