"""The shipped ``configs/`` and ``shards/`` folders, found without a clone.

The repository keeps them as top-level folders; a wheel carries them as package data
(``mllmfl_dist/configs/``, ``mllmfl_dist/shards/``; see pyproject.toml). A path a user writes, such as
``configs/smoke.toml`` or the shard pattern ``shards/fmnist_lt/train-*.tar.gz``, means what it says relative
to the working directory when that exists; otherwise it resolves against the installed package's data, or,
in a source checkout run from elsewhere, against the checkout's folders.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_FOLDERS = ("configs", "shards")


def shipped_folder(name: str) -> Path | None:
    """The installed ``mllmfl_dist/<name>/`` (a wheel), else the checkout's ``<repo>/<name>/``; None if neither."""
    package = Path(__file__).resolve().parents[1]  # mllmfl_dist/ (this file is mllmfl_dist/core/resources.py)
    for candidate in (package / name, package.parent / name):
        if candidate.is_dir():
            return candidate
    return None


def resolve_path(path: str | Path) -> Path:
    """``path`` when it exists (or is absolute, or is not under a shipped folder); otherwise the shipped file
    it names, when there is one. Missing files come back unchanged, so the caller's error names what the
    user wrote."""
    path = Path(path)
    if path.is_absolute() or path.exists() or not path.parts or path.parts[0] not in SHIPPED_FOLDERS:
        return path
    root = shipped_folder(path.parts[0])
    if root is None:
        return path
    shipped = root.joinpath(*path.parts[1:])
    return shipped if shipped.exists() else path


def shipped_pattern(pattern: str) -> str:
    """A shard pattern (glob or brace): unchanged unless it starts with ``shards/`` and the working directory
    has no ``shards/`` folder, in which case it points into the shipped shards."""
    head, sep, rest = pattern.partition("/")
    if not sep or head not in SHIPPED_FOLDERS or Path(head).exists():
        return pattern
    root = shipped_folder(head)
    return f"{root}/{rest}" if root is not None else pattern
