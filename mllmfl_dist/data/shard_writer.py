"""WebDataset tar shards: the format's names and the deterministic writer (the reader is :mod:`.shards`).

The format is documented in :mod:`.shards` and ``shards/README.md``. The writer is deterministic: fixed
member times, owners and modes, and a gzip header without time or file name, so rebuilding gives the same
bytes. Each shard is written to ``<name>.partial`` and renamed when complete, so a reader never sees a
half-written shard under its real name; a writer killed before the rename leaves the ``.partial`` file,
which the next write of the same shards removes.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


from ..core.checkpoint import as_output_error, write_text_atomic
from .base import DataError
from .images import encode_png

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CLASSES_FILE = "classes.json"
SHARD_DIGITS = 6
PARTIAL_SUFFIX = ".partial"
# Tar member metadata written for every member; fixed so rebuilt shards are byte-identical.
_MTIME = 0
_USER = "bigdata"
_MODE = 0o444


def shard_pattern(pattern: str, compress: bool = True) -> str:
    """The printf pattern of the shard file names.

    A ``pattern`` without ``%`` is a prefix: ``out/train`` gives ``out/train-%06d.tar.gz`` (``.tar``
    uncompressed). A pattern with ``%`` (``out/train-%06d.tar.gz``) is used as it is and its suffix must
    agree with ``compress``.
    """
    if "%" not in pattern:
        return f"{pattern}-%0{SHARD_DIGITS}d" + (".tar.gz" if compress else ".tar")
    gz = pattern.endswith((".tar.gz", ".tgz"))
    if not gz and not pattern.endswith(".tar"):
        raise ValueError(f"shard pattern {pattern!r} must end with .tar or .tar.gz")
    if gz != compress:
        raise ValueError(f"shard pattern {pattern!r} does not match compress={compress}")
    try:
        pattern % 0
    except (TypeError, ValueError):
        raise ValueError(f"shard pattern {pattern!r} must hold exactly one integer field such as %06d") from None
    return pattern


def existing_shards(pattern: str) -> list[Path]:
    """Files that a :func:`shard_pattern` pattern could have written (any shard number), sorted."""
    head, _, tail = re.split(r"(%0?\d*d)", pattern, maxsplit=1)
    regex = re.compile(re.escape(os.path.basename(head)) + r"\d+" + re.escape(tail) + r"\Z")
    folder = Path(os.path.dirname(head) or ".")
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and regex.match(p.name))


def unsafe_member_name(name: str) -> bool:
    """Whether a tar member name (or sample key) is absolute or climbs out with ``..``: such a name must
    never be copied into another shard (a tool that extracts it writes outside its folder)."""
    return name.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", name)


def _encode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """A sample dict of the writer (see :func:`write_shards`) as webdataset's ``{__key__, ext: bytes}``."""
    key = str(sample["key"])
    if not key or "." in os.path.basename(key) or unsafe_member_name(key):
        raise ValueError(f"sample key {key!r} must be non-empty, relative, without '..' and without '.'")
    out: dict[str, Any] = {"__key__": key}
    if sample.get("image_bytes") is not None:
        ext = str(sample.get("image_ext", "png")).lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            raise ValueError(f"sample {key}: image_ext {ext!r} is not one of {', '.join(IMAGE_EXTS)}")
        out[ext] = bytes(sample["image_bytes"])
    elif sample.get("image") is not None:
        out["png"] = encode_png(sample["image"])
    if sample.get("cls") is not None:
        out["cls"] = str(int(sample["cls"])).encode("ascii")
    if sample.get("txt") is not None:
        out["txt"] = str(sample["txt"]).encode("utf-8")
    if sample.get("json") is not None:
        out["json"] = json.dumps(sample["json"], sort_keys=True, ensure_ascii=False).encode("utf-8")
    for ext, value in (sample.get("extra") or {}).items():
        if ext in out or ext.startswith("_"):
            raise ValueError(f"sample {key}: extra member {ext!r} clashes with a standard one")
        out[ext] = bytes(value)
    if len(out) == 1:
        raise ValueError(f"sample {key} has no members")
    return out


class _ShardFile:
    """One shard being written: a ``.partial`` file renamed into place on close, gzip without a time stamp."""

    def __init__(self, path: Path, compress: bool) -> None:
        import webdataset

        self.path = path
        self.partial = path.with_name(path.name + PARTIAL_SUFFIX)
        self._raw = open(self.partial, "wb")
        # filename="" and mtime=0 keep the gzip header free of anything that changes between rebuilds.
        self._gz = (
            gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, compresslevel=9, mtime=0) if compress else None
        )
        self.writer = webdataset.TarWriter(
            self._gz or self._raw, compress=False, encoder=False, mtime=_MTIME, user=_USER, group=_USER, mode=_MODE
        )

    def close(self) -> None:
        self.writer.close()  # ends the tar stream; the file objects were passed in, so they stay open
        if self._gz is not None:
            self._gz.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())  # the shard's bytes are on disk before its name says it is complete
        self._raw.close()
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        for f in (self.writer, self._gz, self._raw):
            if f is not None:
                try:
                    f.close()
                except Exception:  # noqa: BLE001 - best effort while another error propagates
                    pass
        self.partial.unlink(missing_ok=True)


def write_shards(
    samples: Iterable[dict[str, Any]],
    pattern: str,
    max_count: int,
    compress: bool = True,
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``samples`` as shards of at most ``max_count`` samples each; returns the shard paths.

    Each sample is a dict: ``key`` (str, unique, no ``.``), the image as ``image`` (PIL image or uint8
    array/tensor, stored as PNG) or ``image_bytes`` + ``image_ext`` (stored as they are), and optional
    ``cls`` (int), ``txt`` (str), ``json`` (JSON-serialisable dict) and ``extra`` ({ext: bytes}).
    ``pattern`` is a prefix or a printf pattern (see :func:`shard_pattern`). Shards already matching the
    pattern are an error unless ``overwrite``, which deletes them first (so no stale shard of an earlier,
    larger build is left behind). Each shard is written to ``<name>.partial`` and renamed when complete;
    if writing fails (a bad sample, an error of the ``samples`` iterator), the shards of this call are removed.
    """
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    pattern = shard_pattern(pattern, compress)
    old = existing_shards(pattern)
    if old and not overwrite:
        raise DataError(
            f"{old[0]} (and {len(old) - 1} more) already exist for {pattern}; remove them or pass --overwrite"
        )
    for path in old + existing_shards(pattern + PARTIAL_SUFFIX):  # .partial: left by a killed writer
        path.unlink()
    Path(os.path.dirname(pattern) or ".").mkdir(parents=True, exist_ok=True)
    import webdataset  # noqa: F401 - fail before opening any file if it is missing

    paths: list[Path] = []
    current: _ShardFile | None = None
    count = 0
    keys: set[str] = set()
    try:
        for sample in samples:
            encoded = _encode_sample(sample)
            if encoded["__key__"] in keys:
                raise ValueError(f"duplicate sample key {encoded['__key__']!r}")
            keys.add(encoded["__key__"])
            if current is None or count >= max_count:
                if current is not None:
                    current.close()
                current = _ShardFile(Path(pattern % len(paths)), compress)
                paths.append(current.path)
                count = 0
            current.writer.write(encoded)
            count += 1
        if current is not None:
            current.close()
            current = None
    except BaseException as err:
        if current is not None:
            current.abort()
        for path in paths:  # no partial set of shards is left behind
            path.unlink(missing_ok=True)
        raise as_output_error(err, paths[-1] if paths else pattern) from None  # a full disk: one line naming the shard
    if not paths:
        raise DataError(f"no samples to write to {pattern}")
    return paths


def write_shard(samples: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write ``samples`` (as for :func:`write_shards`) into the one shard ``path``, gzip-compressed when
    it ends with ``.tar.gz`` / ``.tgz``; written to ``<path>.partial`` and renamed when complete."""
    path = Path(path)
    if not path.name.endswith(SHARD_SUFFIXES):
        raise ValueError(f"shard {path} must end with one of {', '.join(SHARD_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    shard = None
    try:
        shard = _ShardFile(path, compress=not path.name.endswith(".tar"))
        for sample in samples:
            shard.writer.write(_encode_sample(sample))
        shard.close()
    except BaseException as err:
        if shard is not None:
            shard.abort()
        raise as_output_error(err, path) from None  # a full disk: one line naming the shard
    return path


def write_classes(folder: str | Path, class_names: Sequence[str]) -> Path:
    """``classes.json`` (a JSON list of class names, index = label) in ``folder``."""
    path = Path(folder) / CLASSES_FILE
    write_text_atomic(path, json.dumps(list(class_names), ensure_ascii=False, indent=1))
    return path
