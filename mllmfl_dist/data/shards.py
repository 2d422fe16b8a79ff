"""WebDataset tar shards: the writer, pattern expansion, a per-shard sample iterator, and the labeled reader.

Format (``shards/README.md`` documents it for users). One sample is the group of consecutive tar members
that share a ``__key__`` (the member name up to the first dot of its base name):

- ``<key>.png`` the image; PNG keeps it lossless, grayscale as mode ``L``, colour as ``RGB``
  (``.jpg``/``.jpeg``/``.webp``/... are read too);
- ``<key>.cls`` optional, the integer class label as ASCII text;
- ``<key>.txt`` optional, a caption (UTF-8);
- ``<key>.json`` optional, metadata (source, original index, class name, ...).

Shards are named ``<prefix>-000000.tar``, or ``.tar.gz`` when gzip-compressed (the default: a tar member
header is 512 bytes, as much as a 28x28 PNG, and gzip removes that overhead). webdataset and Python's
``tarfile`` read both transparently. The writer is deterministic: fixed member times, owners and modes,
and a gzip header without time or file name, so rebuilding gives the same bytes.

Readers: :func:`iter_samples` reads one shard with ``tarfile`` and yields plain dicts; a damaged shard
raises :class:`ShardError` after the samples before the damage. :func:`decode_image` is separate, so a
caller that streams (annotation) can skip and count a corrupt image. :func:`read_labeled_shards` loads
labeled shards into memory as client data and is strict: any damage is a :class:`DataError`.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..resources import shipped_pattern
from .base import DataError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CLASSES_FILE = "classes.json"
SHARD_DIGITS = 6
# Tar member metadata written for every member; fixed so rebuilt shards are byte-identical.
_MTIME = 0
_USER = "bigdata"
_MODE = 0o444


class ShardError(DataError):
    """A shard that cannot be read to its end (truncated, not a tar, not gzip, split sample); the message
    names the shard and the last good key."""


class CorruptImageError(DataError):
    """Image bytes that PIL cannot decode."""


# -------------------------------------------------------------------------------------------- writing


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


def to_pil(image: Any):
    """A PIL image from a uint8 array/tensor ``[H, W]``, ``[1, H, W]`` (mode ``L``) or ``[3, H, W]``
    (``RGB``); a PIL image is returned as it is."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[0] == 3:
        return Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), mode="RGB")
    if array.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(array), mode="L")
    raise ValueError(f"image arrays must be [H, W], [1, H, W] or [3, H, W], got {array.shape}")


def encode_png(image: Any) -> bytes:
    """PNG bytes of a PIL image, or of a uint8 array/tensor ``[H, W]``, ``[1, H, W]`` or ``[3, H, W]``
    (grayscale is written as mode ``L``, three channels as ``RGB``)."""
    image = to_pil(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def _encode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """A sample dict of the writer (see :func:`write_shards`) as webdataset's ``{__key__, ext: bytes}``."""
    key = str(sample["key"])
    if not key or "." in os.path.basename(key) or key.startswith("/"):
        raise ValueError(f"sample key {key!r} must be non-empty, relative and without '.'")
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
        self.partial = path.with_name(path.name + ".partial")
        self._raw = open(self.partial, "wb")
        # filename="" and mtime=0 keep the gzip header free of anything that changes between rebuilds.
        self._gz = (gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, compresslevel=9, mtime=0)
                    if compress else None)
        self.writer = webdataset.TarWriter(self._gz or self._raw, compress=False, encoder=False, mtime=_MTIME,
                                           user=_USER, group=_USER, mode=_MODE)

    def close(self) -> None:
        self.writer.close()  # ends the tar stream; the file objects were passed in, so they stay open
        if self._gz is not None:
            self._gz.close()
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
        raise DataError(f"{old[0]} (and {len(old) - 1} more) already exist for {pattern}; "
                        "remove them or pass --overwrite")
    for path in old:
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
    except BaseException:
        if current is not None:
            current.abort()
        for path in paths:  # no partial set of shards is left behind
            path.unlink(missing_ok=True)
        raise
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
    shard = _ShardFile(path, compress=not path.name.endswith(".tar"))
    try:
        for sample in samples:
            shard.writer.write(_encode_sample(sample))
    except BaseException:
        shard.abort()
        raise
    shard.close()
    return path


def write_classes(folder: str | Path, class_names: Sequence[str]) -> Path:
    """``classes.json`` (a JSON list of class names, index = label) in ``folder``."""
    path = Path(folder) / CLASSES_FILE
    path.write_text(json.dumps(list(class_names), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path


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
    sample: dict[str, Any] = {"key": key, "image_bytes": None, "image_ext": None, "cls": None, "txt": None,
                              "json": None, "extra": {}, "error": None}
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


def iter_samples(path: str | Path) -> Iterator[dict[str, Any]]:
    """Samples of one shard (``.tar`` or ``.tar.gz``), in tar order, as dicts::

        {"key": str, "image_bytes": bytes | None, "image_ext": "png" | "jpg" | ... | None,
         "cls": int | None, "txt": str | None, "json": dict | None,
         "extra": {ext: bytes} (other members), "error": str | None}

    ``error`` describes a sample whose members could not be parsed (no image, a non-integer ``.cls``, bad
    JSON or UTF-8); such a sample is yielded anyway so the caller can skip and count it. Images are not
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
        raise ShardError(f"shard {path} is damaged {where} ({type(err).__name__}: {detail}); "
                         "rebuild or re-download it") from None


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


def decode_image(data: bytes):
    """A fully decoded PIL image; :class:`CorruptImageError` when PIL cannot decode ``data``."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise CorruptImageError(f"cannot decode image ({type(err).__name__}: {err})") from None
    return image


def image_to_array(image) -> np.ndarray:
    """uint8 ``[C, H, W]``: grayscale modes give C = 1, everything else RGB (alpha dropped), C = 3."""
    if image.mode != "L":
        image = image.convert("L" if image.mode in ("1", "LA", "La", "I", "I;16", "F") else "RGB")
    array = np.array(image, dtype=np.uint8)  # a writable copy (np.asarray of a PIL image is read-only)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def read_labeled_shards(paths: str | Path | Sequence[str | Path]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images uint8 ``[N, C, H, W]``, labels int64 ``[N]`` and keys of every sample of ``paths`` (a list of
    shards, or a pattern for :func:`expand_shards`), in shard order.

    Strict, since the result is training or test data: a damaged shard, an undecodable image, a sample
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
                array = image_to_array(decode_image(sample["image_bytes"]))
            except CorruptImageError as err:
                raise DataError(f"{where}: {err}") from None
            if shape is None:
                shape = array.shape
            elif array.shape != shape:
                raise DataError(f"{where}: image is {_describe(array.shape)}, the first one {_describe(shape)}; "
                                "all images must share size and channels")
            seen[key] = path
            arrays.append(array)
            labels.append(sample["cls"])
            keys.append(key)
    if not arrays:
        raise DataError(f"no samples in {', '.join(str(p) for p in paths) or 'an empty shard list'}")
    images = torch.from_numpy(np.stack(arrays))
    return images, torch.tensor(labels, dtype=torch.int64), keys


def _describe(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[2]} with {shape[0]} channel{'s' if shape[0] != 1 else ''}"


# ------------------------------------------------------------------------------ client-data source


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def resolve_pattern(pattern: str, key: str) -> list[Path]:
    """:func:`expand_shards` for the config key ``key``; a relative pattern that matches nothing from the
    working directory is tried from the repository root, where the shipped ``shards/`` lives."""
    if not pattern.strip():
        raise DataError(f"{key} is empty; set it to a shard pattern such as "
                        f"shards/fmnist_lt/train-*.tar.gz (--set {key}=PATTERN)")
    try:
        return expand_shards(pattern)
    except DataError as err:
        first = err
    root = _repo_root()
    if not os.path.isabs(os.path.expanduser(pattern)) and (root / "shards").is_dir() and root != Path.cwd().resolve():
        try:
            return expand_shards(str(root / pattern))
        except DataError:
            pass
    raise DataError(f"{key} = {pattern!r}: {first}; set {key} (--set {key}=PATTERN) to existing shards")


def load_labeled_shards(train_pattern: str, test_pattern: str,
                        train_key: str = "data.train_shards", test_key: str = "data.test_shards"):
    """Labeled train and test shards as :class:`~mllmfl_dist.data.sources.LabeledArrays`.

    Class names come from ``classes.json`` beside the first train shard, else ``class_<i>`` up to the
    largest label. mean/std are the per-channel statistics of the train images.
    """
    from .sources import LabeledArrays

    train_paths = resolve_pattern(train_pattern, train_key)
    test_paths = resolve_pattern(test_pattern, test_key)
    train_images, train_labels, _ = read_labeled_shards(train_paths)
    test_images, test_labels, _ = read_labeled_shards(test_paths)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(f"{test_key}: test images are {_describe(tuple(test_images.shape[1:]))}, the train "
                        f"images ({train_key}) {_describe(tuple(train_images.shape[1:]))}")
    largest = int(max(train_labels.max(), test_labels.max()))
    names = read_classes(train_paths[0].parent)
    if names is None:
        names = [f"class_{c}" for c in range(largest + 1)]
    elif largest >= len(names):
        raise DataError(f"{train_key}: label {largest} is out of range for the {len(names)} classes of "
                        f"{train_paths[0].parent / CLASSES_FILE}")
    mean, std = channel_stats(train_images)
    return LabeledArrays(
        train_images=train_images,
        train_labels=train_labels.numpy(),
        test_images=test_images,
        test_labels=test_labels,
        class_names=tuple(names),
        mean=mean,
        std=std,
    )


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 ``[N, C, H, W]`` images in [0, 1] units, exact
    from a 256-bin histogram per channel, so no float copy of the images is made."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        total = hist.sum()
        mean = float((hist * values).sum() / total)
        var = float((hist * (values - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(max(var, 0.0) ** 0.5 or 1.0)  # a constant channel normalises by 1, not 0
    return tuple(means), tuple(stds)
