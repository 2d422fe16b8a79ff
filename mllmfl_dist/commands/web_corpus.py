"""``python -m mllmfl_dist.commands.web_corpus``: build the web-like image-text corpus ``shards/fmnist_web/``.

Fashion-MNIST training images with alt-text-like captions (``mllmfl_dist.standins.web_captions``) and no label:
the stand-in for the web image-text data the knowledge-bearing CLIP and LLaVA stand-ins are trained on
(``python -m mllmfl_dist tiny-models DIR --train shards/fmnist_web``).

Selection: the training images with START <= index < STOP (``--indices``), minus every (split, index) found
in the ``.json`` of the ``--exclude`` shards (the alignment pool), then the first ``n_c`` remaining images
of each class in index order, with ``n_c`` from ``reversed_tail_counts(--n-max, --mix-factor)`` (the last
class is the head, unlike the clients' long tail). Samples are written in index order, each with the image
(PNG, pixels unchanged), the caption (``.txt``) and ``.json`` provenance: source, split, index and
``caption``, one of ``true_class`` / ``wrong_class`` / ``no_class`` (how the caption was made). No ``.cls``
and no ``classes.json``. The caption of an image is drawn from a generator seeded by ``(--seed, index)``,
so it does not depend on which other images are selected. The output is deterministic (same bytes on
rerun, as every shard written by ``mllmfl_dist.data.shards.write_shards``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mllmfl_dist.data.base import DataError
from mllmfl_dist.data.shards import expand_shards, iter_samples, write_shards
from mllmfl_dist.data.images import encode_png
from mllmfl_dist.standins.web_captions import make_caption, reversed_tail_counts
from mllmfl_dist.data.sources import load_fashion_mnist
from mllmfl_dist.commands.source_indices import parse_indices

USAGE_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mllmfl_dist.commands.web_corpus",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--root", default="", help="Fashion-MNIST idx folder (default: the search path)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--prefix", default="web", help="shard name prefix (default %(default)s)")
    parser.add_argument(
        "--indices",
        default="50000:59488",
        metavar="START:STOP",
        help="training-split index range to draw from (default %(default)s)",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="shards whose .json (split, index) samples are left out; repeatable",
    )
    parser.add_argument("--n-max", type=int, default=950, help="images of the head class (default %(default)s)")
    parser.add_argument(
        "--mix-factor",
        type=float,
        default=0.4,
        help="tail / head ratio of the reversed class mix (default %(default)s)",
    )
    parser.add_argument(
        "--wrong-fraction",
        type=float,
        default=0.1,
        help="fraction of captions naming a wrong class (default %(default)s)",
    )
    parser.add_argument(
        "--no-class-fraction",
        type=float,
        default=0.1,
        help="fraction of captions naming no class (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="caption seed (default %(default)s)")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already there for this prefix")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(build_corpus(args))
    except DataError as err:
        print(f"mllmfl_dist: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    return 0


def excluded_indices(patterns: Sequence[str], split: str) -> set[int]:
    """Indices of ``split`` that the ``.json`` of the samples of the shards of ``patterns`` name."""
    found: set[int] = set()
    for pattern in patterns:
        for path in expand_shards(pattern):
            for sample in iter_samples(path):
                meta = sample.get("json") or {}
                if meta.get("split") == split and isinstance(meta.get("index"), int):
                    found.add(meta["index"])
    return found


def select_corpus(labels: np.ndarray, start: int, stop: int, excluded: set[int], counts: Sequence[int]) -> np.ndarray:
    """Sorted indices: the first ``counts[c]`` indices of class c in ``[start, stop)`` that are not
    ``excluded``. Raises DataError when a class has fewer."""
    candidates = np.array([i for i in range(start, stop) if i not in excluded], dtype=np.int64)
    chosen = []
    for c, n in enumerate(counts):
        members = candidates[labels[candidates] == c]
        if len(members) < n:
            raise DataError(
                f"class {c} has {len(members)} eligible images in {start}:{stop}, {n} wanted; lower --n-max"
            )
        chosen.append(members[:n])
    return np.sort(np.concatenate(chosen))


def corpus_samples(
    images, labels: np.ndarray, chosen: np.ndarray, seed: int, wrong_fraction: float, no_class_fraction: float
) -> Iterator[dict[str, Any]]:
    """The writer's sample dicts (image PNG, caption, provenance) of the ``chosen`` training images."""
    for i in chosen.tolist():
        rng = np.random.default_rng([seed, i])
        caption, _, kind = make_caption(rng, int(labels[i]), wrong_fraction, no_class_fraction)
        yield {
            "key": f"fashion_mnist_train_{i:06d}",
            "image_bytes": encode_png(images[i]),
            "image_ext": "png",
            "txt": caption,
            "json": {"source": "fashion_mnist", "split": "train", "index": i, "caption": kind},
        }


def build_corpus(args: argparse.Namespace) -> str:
    """Write the corpus of ``args``; returns a short report (samples, MB, per-class counts, caption kinds)."""
    for name in ("wrong_fraction", "no_class_fraction"):
        value = getattr(args, name)
        if not 0 <= value <= 1:
            raise DataError(f"--{name.replace('_', '-')} {value}: must be in [0, 1]")
    if args.wrong_fraction + args.no_class_fraction > 1:
        raise DataError("--wrong-fraction + --no-class-fraction must be <= 1")
    if args.n_max < 1 or not 0 < args.mix_factor <= 1:
        raise DataError("need --n-max >= 1 and 0 < --mix-factor <= 1")
    arrays = load_fashion_mnist(args.root)
    labels = np.asarray(arrays.train_labels, dtype=np.int64)
    start, stop = parse_indices(args.indices, len(labels))
    counts = reversed_tail_counts(args.n_max, args.mix_factor, len(arrays.class_names))
    chosen = select_corpus(labels, start, stop, excluded_indices(args.exclude, "train"), counts)
    samples = corpus_samples(
        arrays.train_images, labels, chosen, args.seed, args.wrong_fraction, args.no_class_fraction
    )
    paths = write_shards(samples, str(Path(args.out) / args.prefix), args.max_count, overwrite=args.overwrite)
    kinds: dict[str, int] = {}
    for path in paths:
        for sample in iter_samples(path):
            kind = sample["json"]["caption"]
            kinds[kind] = kinds.get(kind, 0) + 1
    size = sum(p.stat().st_size for p in paths)
    return (
        f"wrote {len(chosen)} samples to {len(paths)} shards ({size / 1e6:.2f} MB): {paths[0]} .. "
        f"{paths[-1].name}\nper class: "
        + ", ".join(f"{c}={n}" for c, n in zip(arrays.class_names, counts))
        + "\ncaptions: "
        + ", ".join(f"{k}={v}" for k, v in sorted(kinds.items()))
    )


if __name__ == "__main__":
    sys.exit(main())
