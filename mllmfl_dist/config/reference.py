"""The configuration reference, generated from the schema: every TOML section with each key's type, default,
allowed values (choices or bounds from the field's metadata, :mod:`mllmfl_dist.config.fields`) and the comments
written beside the field in the source, so the page cannot drift from the dataclasses.

    python -m mllmfl_dist.config.reference > docs/reference/configuration.md
    python -m mllmfl_dist.config.reference --write    # the same
    python -m mllmfl_dist.config.reference --check    # exit 1 when the committed page differs

Only the built-in strategies' sections are listed (``plugins.BUILTIN_SECTIONS``), never an installed plugin's,
so the page is the same on every machine. Imports no torch (the schema does not).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import io
import sys
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any

import tomli_w

from mllmfl_dist.config.fields import CHECK, CHOICES, PATH
from mllmfl_dist.config.schema import CORE_SECTIONS, Config
from mllmfl_dist.config import plugins

PAGE = Path(__file__).resolve().parents[2] / "docs" / "reference" / "configuration.md"
COMMAND = "python -m mllmfl_dist.config.reference --write"

HEADER = f"""# Configuration reference

<!-- Generated from mllmfl_dist/config/schema.py and strategy_sections.py by `{COMMAND}`; do not edit. -->

A config is a TOML file with one table per section below; a key it omits takes the default shown. Any key can be
overridden on the command line with `--set section.key=value`, parsed as the key's type. An unknown section or
key, a wrong type or a value outside what the "allowed" column says ends the command with one line and exit
code 2. "path": `~` is expanded (also after `local-dir:` and `file:`). Every float must also be finite and fit
float32. How the keys work together: [Configuration notes](config-notes.md).
"""


def field_comments(cls: type) -> dict[str, str]:
    """The comment lines directly above each field of the dataclass ``cls`` and the comments on its own lines,
    joined into one text per field name."""
    source = textwrap.dedent("".join(inspect.getsourcelines(cls)[0]))  # a class defined inside a function
    lines = source.splitlines()
    comment_at = {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    comments: dict[str, str] = {}
    previous_end = 0  # 1-based last line of the statement before the field
    definition = ast.parse(source).body[0]
    assert isinstance(definition, ast.ClassDef)
    for node in definition.body:
        end = node.end_lineno if node.end_lineno is not None else node.lineno
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above: list[str] = []
            for number in range(node.lineno - 1, previous_end, -1):
                if not lines[number - 1].strip().startswith("#"):
                    break
                above.insert(0, comment_at[number])
            beside = [comment_at[n] for n in range(node.lineno, end + 1) if n in comment_at]
            comments[node.target.id] = " ".join(part for part in above + beside if part)
        previous_end = end
    return comments


def sections() -> list[tuple[str, type]]:
    """Every section a config may hold, as (TOML name, dataclass): the run's own in the TOML's order, the
    built-in strategies' after ``federated``, a nested table (``pretrain.deepspeed``) after its parent."""
    hints = typing.get_type_hints(Config)
    strategy = [(name, _load(path)) for name, path in plugins.BUILTIN_SECTIONS.items()]
    out: list[tuple[str, type]] = []
    for name in CORE_SECTIONS:
        out.extend(_with_nested(name, hints[name]))
        if name == "federated":
            out.extend(strategy)
    return out


def _with_nested(name: str, cls: type) -> list[tuple[str, type]]:
    hints = typing.get_type_hints(cls)
    nested = [
        (f"{name}.{f.name}", hints[f.name]) for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])
    ]
    return [(name, cls), *nested]


def _load(path: str) -> type:
    module, _, attribute = path.partition(":")
    loaded = getattr(importlib.import_module(module), attribute)
    assert isinstance(loaded, type), path
    return loaded


def _toml_value(value: Any) -> str:
    """``value`` as TOML writes it (``"rank0"``, ``true``, ``1e-05``)."""
    return tomli_w.dumps({"v": value}).strip()[len("v = ") :]


def _cell(text: str) -> str:
    """Prose for a table cell: a pipe would end the cell, ``<name>`` would be read as HTML, ``a * b * c`` as
    emphasis."""
    return text.replace("|", "&#124;").replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")


def _code(text: str) -> str:
    return f"`{text}`" if "|" not in text else f"<code>{_cell(text)}</code>"


def section_table(name: str, cls: type) -> str:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    # A dataclass without a docstring gets its signature as __doc__: not a description.
    doc = cls.__doc__ if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}(") else ""
    rows = [f"## `[{name}]`", ""]
    if doc:
        rows += [_cell(" ".join(doc.split())), ""]
    rows += ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    for spec in dataclasses.fields(cls):
        kind = hints[spec.name]
        if dataclasses.is_dataclass(kind):
            continue  # its own table follows
        type_name = kind.__name__ + (", path" if spec.metadata.get(PATH) else "")
        if CHOICES in spec.metadata:
            allowed = ", ".join(_code(_toml_value(c)) for c in spec.metadata[CHOICES])
        elif CHECK in spec.metadata:
            allowed = _cell(spec.metadata[CHECK][1])
        else:
            allowed = ""
        rows.append(
            f"| `{spec.name}` | {type_name} | {_code(_toml_value(spec.default))} | {allowed} | "
            f"{_cell(comments.get(spec.name, ''))} |"
        )
    return "\n".join(rows) + "\n"


def render() -> str:
    """The whole page."""
    return "\n".join([HEADER] + [section_table(name, cls) for name, cls in sections()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mllmfl_dist.config.reference", description=__doc__.split("\n")[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"write {PAGE.relative_to(PAGE.parents[2])}")
    action.add_argument("--check", action="store_true", help="exit 1 when that file differs from the schema")
    args = parser.parse_args(argv)
    page = render()
    if args.write:
        PAGE.write_text(page)
    elif args.check:
        if not PAGE.is_file() or PAGE.read_text() != page:
            print(f"{PAGE} is out of date with the config schema; regenerate it with `{COMMAND}`", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
