"""WebDataset tar shards: pattern expansion, a per-shard sample iterator, and the labeled reader (the writer,
:mod:`.shard_writer`, is re-exported here).

Format (``shards/README.md`` documents it for users). One sample is the group of consecutive tar members
that share a ``__key__`` (the member name up to the first dot of its base name):

- ``<key>.png`` the image; PNG keeps it lossless, grayscale as mode ``L``, colour as ``RGB``
  (``.jpg``/``.jpeg``/``.webp``/... are read too);
- ``<key>.cls`` optional, the integer class label as ASCII text;
- ``<key>.txt`` optional, a caption (UTF-8);
- ``<key>.json`` optional, metadata (source, original index, class name, ...).

Shards are named ``<prefix>-000000.tar``, or ``.tar.gz`` when gzip-compressed (the default: a tar member
header is 512 bytes, as much as a 28x28 PNG, and gzip removes that overhead). webdataset and Python's
``tarfile`` read both transparently.

Readers: :func:`iter_samples` reads one shard with ``tarfile`` and yields plain dicts; a damaged shard
raises :class:`ShardError` after the samples before the damage. :func:`decode_image` is separate, so a
caller that streams (annotation) can skip and count a corrupt image. :func:`read_labeled_shards` loads
labeled shards into memory and is strict: any damage is a :class:`DataError`; :mod:`.labeled_shards` makes
client data of them.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.resources import shipped_pattern
from .base import DataError

# The writer lives in its own module; its names stay importable from here.
from .images import CorruptImageError, ImageBounds, UnusableImageError, decode_image, image_to_array  # noqa: F401
from .shard_writer import (  # noqa: F401
    CLASSES_FILE,
    IMAGE_EXTS,
    SHARD_SUFFIXES,
    existing_shards,
    shard_pattern,
    unsafe_member_name,
    write_classes,
    write_shard,
    write_shards,
)


class ShardError(DataError):
    """A shard that cannot be read to its end (truncated, not a tar, not gzip, split sample); the message
    names the shard and the last good key."""


def read_classes(folder: str | Path) -> list[str] | None:
    """The class names of ``folder/classes.json``, or None when there is none."""
    path = Path(folder) / CLASSES_FILE
    if not path.is_file():
        return None
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not readable JSON ({err}); rewrite it as a list of class names") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: must be a JSON list of class names (strings)")
    return names


# ------------------------------------------------------------------------------------------ expansion


def expand_shards(pattern: str) -> list[Path]:
    """The shard files of ``pattern``, sorted: brace expansion (``train-{000000..000003}.tar.gz``, comma
    lists), then globs (``train-*.tar.gz``); a directory stands for the shards inside it.

    A pattern that matches nothing, or a brace-expanded name without glob characters that does not
    exist (a missing shard), raises :class:`DataError` naming the pattern.
    """
    from braceexpand import braceexpand

    pattern = shipped_pattern(str(pattern).strip())  # shards/... without a clone: the shipped shards
    if not pattern:
        raise DataError("empty shard pattern")
    found: set[Path] = set()
    for item in braceexpand(os.path.expanduser(pattern)):
        if glob.has_magic(item):
            found.update(Path(p) for p in glob.glob(item) if os.path.isfile(p))
        elif os.path.isdir(item):
            found.update(p for p in Path(item).iterdir() if p.is_file() and p.name.endswith(SHARD_SUFFIXES))
        elif os.path.isfile(item):
            found.add(Path(item))
        else:
            raise DataError(f"shard {item} of pattern {pattern!r} does not exist")
    if not found:
        raise DataError(f"no shard file matches {pattern!r}")
    return sorted(found)


# -------------------------------------------------------------------------------------------- reading


def _split_name(name: str) -> tuple[str, str] | None:
    """``(key, ext)`` of a member name, webdataset's rule: the key runs to the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext


def _parse_sample(key: str, members: dict[str, bytes]) -> dict[str, Any]:
    sample: dict[str, Any] = {
        "key": key,
        "image_bytes": None,
        "image_ext": None,
        "cls": None,
        "txt": None,
        "json": None,
        "extra": {},
        "error": None,
    }
    if unsafe_member_name(key):
        # Never passed on: annotation would copy the name into its own shards, and extracting those writes
        # outside the target folder.
        sample["error"] = "the member name is absolute or contains '..'; such a sample is not read"
        return sample
    errors = []
    for ext, value in members.items():
        low = ext.lower()
        if low in IMAGE_EXTS and sample["image_bytes"] is None:
            sample["image_bytes"], sample["image_ext"] = value, low
        elif low == "cls":
            try:
                sample["cls"] = int(value.decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                errors.append(f".cls is not an integer: {value[:20]!r}")
        elif low == "txt":
            try:
                sample["txt"] = value.decode("utf-8")
            except UnicodeDecodeError:
                errors.append(".txt is not UTF-8")
        elif low == "json":
            try:
                sample["json"] = json.loads(value.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                errors.append(".json is not valid JSON")
        else:
            sample["extra"][ext] = value
    if sample["image_bytes"] is None:
        errors.append("no image member")
    sample["error"] = "; ".join(errors) or None
    return sample


def _stray_member(name: str) -> dict[str, Any]:
    base = name.rpartition("/")[2]
    why = "starts with a dot (a hidden file)" if base.startswith(".") else "has no extension"
    return {
        "key": name,
        "image_bytes": None,
        "image_ext": None,
        "cls": None,
        "txt": None,
        "json": None,
        "extra": {},
        "error": f"member {name!r} is not part of a sample: its name {why}",
    }


def iter_samples(path: str | Path) -> Iterator[dict[str, Any]]:
    """Samples of one shard (``.tar`` or ``.tar.gz``), in tar order, as dicts::

        {"key": str, "image_bytes": bytes | None, "image_ext": "png" | "jpg" | ... | None,
         "cls": int | None, "txt": str | None, "json": dict | None,
         "extra": {ext: bytes} (other members), "error": str | None}

    ``error`` describes a sample whose members could not be parsed (no image, a non-integer ``.cls``, bad
    JSON or UTF-8, a member name that is absolute or contains ``..``: none of its members is passed on); such
    a sample is yielded anyway so the caller can skip and count it. A member that belongs to no sample (its
    base name starts with a dot or has none, e.g. ``.hidden``) is yielded on its own, keyed by its name, with
    an ``error``. Images are not
    decoded here (see :func:`decode_image`). A shard that is damaged (truncated, not a tar/gzip, a key
    whose members are not consecutive) raises :class:`ShardError` naming the shard after every complete
    sample before the damage was yielded; the sample the damage falls in is not yielded.
    """
    path = Path(path)
    last_key = None
    try:
        # Random-access mode, not streaming, over a reader that remembers its last read: tarfile stops
        # silently at a header that is missing, cut short or invalid, so after the last member the
        # header read that ended the loop must be the all-zero end-of-archive block. Then the rest is
        # read (gzip checks its CRC and length at the end).
        with _open_shard(path) as stream, tarfile.open(fileobj=stream, mode="r:") as tar:
            key, members, done = None, {}, set()
            for info in tar:
                if not info.isfile():
                    continue
                split = _split_name(info.name)
                if split is None:
                    # webdataset drops such a member silently; it is yielded as a sample with an error, so
                    # every member is either used or counted
                    yield _stray_member(info.name)
                    continue
                member_key, ext = split
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
                if len(data) != info.size:
                    raise EOFError(f"member {info.name} is cut short")
                if member_key != key:
                    if key is not None:
                        done.add(key)
                        last_key = key
                        yield _parse_sample(key, members)
                    if member_key in done:
                        raise ShardError(f"shard {path}: the members of sample {member_key!r} are not consecutive")
                    key, members = member_key, {}
                if ext in members:
                    raise ShardError(f"shard {path}: sample {member_key!r} has two .{ext} members")
                members[ext] = data
            end = stream.last_read
            if len(end) != tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
                what = "ends without the end-of-archive block" if len(end) == 0 else "holds an unreadable header"
                raise tarfile.ReadError(f"the archive {what} (truncated or overwritten)")
            while stream.read(1 << 20):
                pass
            if key is not None:
                last_key = key
                yield _parse_sample(key, members)
    except ShardError:
        raise
    except FileNotFoundError:
        raise ShardError(f"shard {path} does not exist") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        where = f"after sample {last_key!r}" if last_key is not None else "before its first sample"
        detail = " ".join(str(err).split())  # tarfile's "could not be opened" lists methods on lines
        raise ShardError(
            f"shard {path} is damaged {where} ({type(err).__name__}: {detail}); rebuild or re-download it"
        ) from None


class _RecordingReader(io.RawIOBase):
    """A seekable binary reader over a plain or gzip file that keeps the bytes of its last ``read``."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "rb")
        gz = self._file.read(2) == b"\x1f\x8b"
        self._file.seek(0)
        self._inner = gzip.GzipFile(fileobj=self._file, mode="rb") if gz else self._file
        self.last_read = b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.last_read = self._inner.read(size)
        return self.last_read

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()

    def close(self) -> None:
        if not self.closed:
            if self._inner is not self._file:
                self._inner.close()
            self._file.close()
        super().close()


def _open_shard(path: Path) -> _RecordingReader:
    return _RecordingReader(path)


def read_labeled_shards(
    paths: str | Path | Sequence[str | Path],
    bounds: ImageBounds | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images uint8 ``[N, C, H, W]``, labels int64 ``[N]`` and keys of every sample of ``paths`` (a list of
    shards, or a pattern for :func:`expand_shards`), in shard order.

    Strict, since the result is training or test data: a damaged shard, an undecodable image or one over
    ``bounds`` (checked before decoding; None: no bound but PIL's), a member outside any sample, a sample
    without ``.cls``, a duplicate key or an image whose size or channel count differs from the first one
    is a :class:`DataError` naming the shard and the key.
    """
    if isinstance(paths, (str, Path)):
        paths = expand_shards(str(paths))
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    keys: list[str] = []
    seen: dict[str, Path] = {}
    shape = None
    for path in paths:
        path = Path(path)
        for sample in iter_samples(path):
            key = sample["key"]
            where = f"shard {path}, sample {key!r}"
            if sample["error"]:
                raise DataError(f"{where}: {sample['error']}")
            if sample["cls"] is None:
                raise DataError(f"{where}: no .cls label; labeled shards need one per sample")
            if sample["cls"] < 0:
                raise DataError(f"{where}: negative label {sample['cls']}")
            if key in seen:
                raise DataError(f"{where}: key also in shard {seen[key]}; a shard is listed twice?")
            try:
                array = image_to_array(decode_image(sample["image_bytes"], bounds))
            except UnusableImageError as err:
                raise DataError(f"{where}: {err}") from None
            if shape is None:
                shape = array.shape
            elif array.shape != shape:
                raise DataError(
                    f"{where}: image is {describe_shape(array.shape)}, the first one "
                    f"{describe_shape(shape)}; all images must share size and channels"
                )
            seen[key] = path
            arrays.append(array)
            labels.append(sample["cls"])
            keys.append(key)
    if not arrays:
        raise DataError(f"no samples in {', '.join(str(p) for p in paths) or 'an empty shard list'}")
    images = torch.from_numpy(np.stack(arrays))
    return images, torch.tensor(labels, dtype=torch.int64), keys


def describe_shape(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[2]} with {shape[0]} channel{'s' if shape[0] != 1 else ''}"
