"""``python -m mllmfl_dist shards``: pack images into WebDataset shards (format: ``shards/README.md``).

Two inputs:

- ``--from-folder DIR``: every .png/.jpg/.jpeg/.webp under DIR (recursively, sorted by path, hidden
  files skipped). With ``--labels-from-subfolders`` each top-level subfolder is a class (index = its
  position among the sorted subfolders that hold images) and ``.cls`` is written.
- ``--from-source NAME --split train|test``: a data source of the package (fashion_mnist, cifar10,
  cifar100, synthetic), optionally restricted to an index range, to the first N samples of each class,
  and long-tailed with the package's rule; ``.cls`` is written unless ``--no-labels``.

Every sample gets a ``.json`` with where it came from (folder path, or source, split and index).
Labeled output also gets ``classes.json`` next to the shards. The output is deterministic.

``add_arguments(parser)`` and ``run(args)`` plug into the package CLI; ``main(argv)`` runs it alone
(``python -m mllmfl_dist.commands.shards``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

from mllmfl_dist.core.errors import DataError
from mllmfl_dist.config import DataConfig
from mllmfl_dist.commands.source_indices import parse_indices, select_indices

# The data modules (numpy, torch) are imported inside the functions that use them: this module adds `shards`
# to the CLI's parser, and `--help` must answer without torch.

USAGE_ERROR = 2
SOURCES = ("fashion_mnist", "cifar10", "cifar100", "synthetic")
FOLDER_EXTS = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_MAX_COUNT = 1000

DESCRIPTION = """\
Pack images into WebDataset shards (<prefix>-000000.tar.gz, ...) of at most --max-count samples each.
Each sample holds the image (.png, or the original .jpg), .json metadata and, when labeled, .cls;
labeled output also gets classes.json next to the shards. See shards/README.md for the format.

examples:
  python -m mllmfl_dist shards --from-folder photos/ --labels-from-subfolders --out shards/photos --max-count 500
  python -m mllmfl_dist shards --from-source fashion_mnist --split test --per-class 100 --out shards/fmnist_lt
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the ``shards`` command, added to ``parser``."""
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--from-folder", metavar="DIR", help="pack every .png/.jpg/.jpeg/.webp under DIR (recursively)")
    inputs.add_argument("--from-source", choices=SOURCES, help="pack a data source of the package")
    out = parser.add_argument_group("output")
    out.add_argument(
        "--out",
        required=True,
        metavar="DIR|PATTERN",
        help="output folder (shards <prefix>-000000.tar.gz, ...), or a file pattern with one "
        "integer field such as out/train-%%06d.tar.gz (its suffix decides compression)",
    )
    out.add_argument("--prefix", help="shard name prefix inside --out DIR (default: the split, or 'images')")
    out.add_argument(
        "--max-count",
        type=int,
        default=DEFAULT_MAX_COUNT,
        metavar="N",
        help=f"samples per shard (default {DEFAULT_MAX_COUNT})",
    )
    out.add_argument("--no-compress", action="store_true", help="write plain .tar instead of .tar.gz")
    out.add_argument(
        "--overwrite", action="store_true", help="replace shards (and classes.json) already there for this prefix"
    )
    folder = parser.add_argument_group("--from-folder options")
    folder.add_argument(
        "--labels-from-subfolders",
        action="store_true",
        help="one top-level subfolder per class: write .cls (sorted subfolder index) and classes.json",
    )
    source = parser.add_argument_group("--from-source options")
    source.add_argument("--split", choices=("train", "test"), help="which split of the source (required)")
    source.add_argument("--root", default="", help="the source's data folder (default: its search path)")
    source.add_argument("--download", action="store_true", help="let torchvision download CIFAR")
    source.add_argument("--seed", type=int, default=0, help="seed of the synthetic source (default 0)")
    source.add_argument(
        "--indices", metavar="START:STOP", help="only samples with START <= index < STOP (either end may be left out)"
    )
    source.add_argument(
        "--per-class",
        type=int,
        metavar="N",
        help="keep the first N samples of each class (in index order) of the selected range",
    )
    source.add_argument(
        "--imb-factor",
        type=float,
        metavar="F",
        help="long tail: class c keeps int(n_max * F ** (c / (C - 1))) of its first samples, "
        "n_max the largest class count after --per-class",
    )
    source.add_argument("--no-labels", action="store_true", help="write no .cls, no class in .json, no classes.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mllmfl_dist shards",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the command; a user error prints one line and returns 2."""
    try:
        summary = pack(args)
    except DataError as err:
        print(f"mllmfl_dist: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    print(summary)
    return 0


# ------------------------------------------------------------------------------------------ packing


def pack(args: argparse.Namespace) -> str:
    """Write the shards of ``args``; returns a short report."""
    from mllmfl_dist.data.shards import CLASSES_FILE, read_classes, write_classes, write_shards

    if args.max_count < 1:
        raise DataError(f"--max-count {args.max_count}: must be >= 1")
    if args.from_folder is not None:
        _reject(args, ("split", "indices", "per_class", "imb_factor", "no_labels", "download"), "--from-folder")
        if args.root:
            raise DataError("--root is an option of --from-source; --from-folder reads its DIR")
        samples, class_names, skipped = _folder_samples(Path(args.from_folder), args.labels_from_subfolders)
        default_prefix = "images"
    else:
        if args.labels_from_subfolders:
            raise DataError("--labels-from-subfolders is an option of --from-folder")
        if args.split is None:
            raise DataError("--from-source needs --split train or --split test")
        samples, class_names = _source_samples(args)
        skipped = []
        default_prefix = args.split
    pattern, compress = _output_pattern(args.out, args.prefix or default_prefix, args.no_compress)
    folder = Path(os.path.dirname(pattern) or ".")
    if class_names is not None:
        old = read_classes(folder) if (folder / CLASSES_FILE).is_file() else None
        if old is not None and old != list(class_names) and not args.overwrite:
            raise DataError(
                f"{folder / CLASSES_FILE} lists other classes ({len(old)}); write to another --out or pass --overwrite"
            )
    paths = write_shards(samples, pattern, args.max_count, compress, overwrite=args.overwrite)
    lines = []
    if class_names is not None:
        write_classes(folder, class_names)
    counts = _count_written(paths, class_names)
    total = sum(counts.values()) if class_names is not None else counts["all"]
    size = sum(p.stat().st_size for p in paths)
    lines.append(
        f"wrote {total} samples to {len(paths)} shard{'s' if len(paths) != 1 else ''} "
        f"({size / 1e6:.2f} MB): {paths[0]}" + (f" .. {paths[-1].name}" if len(paths) > 1 else "")
    )
    if class_names is not None:
        lines.append("per class: " + ", ".join(f"{c}={counts.get(i, 0)}" for i, c in enumerate(class_names)))
        lines.append(f"classes: {folder / CLASSES_FILE}")
    if skipped:
        lines.append(
            f"skipped {len(skipped)} unreadable image{'s' if len(skipped) != 1 else ''}: "
            + ", ".join(skipped[:5])
            + (" ..." if len(skipped) > 5 else "")
        )
    return "\n".join(lines)


def _reject(args: argparse.Namespace, names: Sequence[str], mode: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value not in (None, False):
            raise DataError(f"--{name.replace('_', '-')} is an option of --from-source, not of {mode}")


def _output_pattern(out: str, prefix: str, no_compress: bool) -> tuple[str, bool]:
    """(printf pattern, compress) of ``--out``: a pattern with a ``%`` field, or a folder plus prefix."""
    from mllmfl_dist.data.shards import shard_pattern

    if "%" in out:
        if out.endswith((".tar.gz", ".tgz")):
            if no_compress:
                raise DataError(f"--out {out} ends with .tar.gz but --no-compress is given; use .tar")
            compress = True
        elif out.endswith(".tar"):
            compress = False
        else:
            raise DataError(f"--out {out}: a file pattern must end with .tar or .tar.gz")
        try:
            return shard_pattern(out, compress), compress
        except ValueError as err:
            raise DataError(f"--out {out}: {err}") from None
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise DataError(f"--prefix {prefix!r}: use letters, digits, '_' and '-' only")
    compress = not no_compress
    return shard_pattern(str(Path(out) / prefix), compress), compress


def _count_written(paths: Sequence[Path], class_names: Sequence[str] | None) -> dict[Any, int]:
    """Samples per label in the written shards (read back, so the report is what is on disk)."""
    from mllmfl_dist.data.shards import iter_samples

    counts: dict[Any, int] = {}
    for path in paths:
        for sample in iter_samples(path):
            label = sample["cls"] if class_names is not None else "all"
            counts[label] = counts.get(label, 0) + 1
    return counts


# ----------------------------------------------------------------------------------------- from folder


def _folder_samples(root: Path, labeled: bool) -> tuple[Iterator[dict[str, Any]], list[str] | None, list[str]]:
    if not root.is_dir():
        raise DataError(f"--from-folder {root}: no such folder")
    files = sorted(
        (
            p
            for p in root.rglob("*")
            if p.is_file()
            and p.suffix.lower() in FOLDER_EXTS
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise DataError(f"--from-folder {root}: no .png/.jpg/.jpeg/.webp image in it or below")
    class_names = None
    if labeled:
        top = [p.relative_to(root).parts for p in files]
        loose = [p for p, parts in zip(files, top) if len(parts) == 1]
        if loose:
            raise DataError(
                f"--labels-from-subfolders: {loose[0]} is not inside a class subfolder of {root} "
                f"({len(loose)} such images)"
            )
        class_names = sorted({parts[0] for parts in top})
    keys: dict[str, Path] = {}
    for path in files:
        key = _folder_key(path.relative_to(root))
        if key in keys:
            raise DataError(f"--from-folder: {keys[key]} and {path} give the same sample key {key!r}; rename one")
        keys[key] = path
    skipped: list[str] = []

    def generate() -> Iterator[dict[str, Any]]:
        index = {name: i for i, name in enumerate(class_names or [])}
        for key, path in keys.items():
            rel = path.relative_to(root).as_posix()
            try:
                image_bytes, ext = _folder_image(path)
            except DataError:
                skipped.append(rel)
                continue
            meta: dict[str, Any] = {"source": "folder", "path": rel}
            sample: dict[str, Any] = {"key": key, "image_bytes": image_bytes, "image_ext": ext, "json": meta}
            if class_names is not None:
                name = path.relative_to(root).parts[0]
                sample["cls"] = index[name]
                meta["class"] = name
            yield sample

    return generate(), class_names, skipped


def _folder_key(rel: Path) -> str:
    """Sample key of an image's relative path: the path without suffix, every character outside
    [A-Za-z0-9_-] (the '/' and any '.' included) replaced by '_'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", rel.with_suffix("").as_posix())


def _folder_image(path: Path) -> tuple[bytes, str]:
    """The bytes and extension to store: PNG and JPEG files in mode L or RGB as they are (no re-encoding),
    anything else converted to L or RGB and written as PNG. A file PIL cannot decode raises DataError."""
    from mllmfl_dist.data.images import decode_image, encode_png

    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    image = decode_image(data)
    if image.format in ("PNG", "JPEG") and image.mode in ("L", "RGB"):
        return data, "png" if image.format == "PNG" else "jpg"
    grey = image.mode in ("1", "LA", "La", "I", "I;16", "F")
    return encode_png(image.convert("L" if grey else "RGB")), "png"


# ----------------------------------------------------------------------------------------- from source


def _load_source(args: argparse.Namespace):
    from mllmfl_dist.data.sources import load_cifar, load_fashion_mnist
    from mllmfl_dist.data.synthetic import synthetic_arrays

    if args.from_source == "fashion_mnist":
        return load_fashion_mnist(args.root)
    if args.from_source in ("cifar10", "cifar100"):
        return load_cifar(args.from_source, args.root, args.download)
    if args.seed < 0:
        raise DataError(f"--seed {args.seed}: must be >= 0")
    return synthetic_arrays(DataConfig(source="synthetic"), args.seed)


def _source_samples(args: argparse.Namespace) -> tuple[Iterator[dict[str, Any]], list[str] | None]:
    if args.per_class is not None and args.per_class < 1:
        raise DataError(f"--per-class {args.per_class}: must be >= 1")
    if args.imb_factor is not None and not 0 < args.imb_factor <= 1:
        raise DataError(f"--imb-factor {args.imb_factor}: must be in (0, 1]")
    import numpy as np

    arrays = _load_source(args)
    if args.split == "train":
        images, labels = arrays.train_images, np.asarray(arrays.train_labels, dtype=np.int64)
    else:
        images, labels = arrays.test_images, arrays.test_labels.numpy().astype(np.int64)
    num_classes = len(arrays.class_names)
    start, stop = parse_indices(args.indices, len(labels))
    chosen = select_indices(labels, num_classes, start, stop, args.per_class, args.imb_factor)
    if len(chosen) == 0:
        raise DataError(f"--from-source {args.from_source} --split {args.split}: the selection is empty")
    width = max(6, len(str(len(labels) - 1)))
    labeled = not args.no_labels

    def generate() -> Iterator[dict[str, Any]]:
        from mllmfl_dist.data.images import encode_png

        for i in chosen.tolist():
            meta: dict[str, Any] = {"source": args.from_source, "split": args.split, "index": i}
            sample: dict[str, Any] = {
                "key": f"{args.from_source}_{args.split}_{i:0{width}d}",
                "image_bytes": encode_png(images[i]),
                "image_ext": "png",
                "json": meta,
            }
            if labeled:
                sample["cls"] = int(labels[i])
                meta["class"] = arrays.class_names[int(labels[i])]
            yield sample

    return generate(), (list(arrays.class_names) if labeled else None)


if __name__ == "__main__":
    sys.exit(main())
