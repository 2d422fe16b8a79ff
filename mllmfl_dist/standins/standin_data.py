"""The training data of the knowledge-bearing MLLM stand-ins: a captioned image corpus and the LLaVA
instruction mix derived from its captions.

- `read_caption_corpus(pattern, limit=None)` -> `(images, captions)`: uint8 `[N, C, H, W]` and N strings from
  WebDataset shards whose samples hold an image and a `.txt` caption (e.g. `shards/fmnist_web/`). Labels are
  never read: the corpus stands in for web data.
- `instruction_pairs(captions, seed)` -> `(image_index, prompt, answer)` triples, LLaVA's recipe at toy
  scale: every caption gives a "describe" pair (a description request -> the caption), and a caption that
  names a garment category (`mllmfl_dist.standins.web_captions.named_category`, the caption parser standing in
  for the language model LLaVA derives its instruction data with) also gives a question pair (a question
  about the object -> the category name). A caption that names no category gives no question pair.

The prompts follow llava-1.5's conversation format, `USER: <image>\\n{request} ASSISTANT:`; the requests
include the annotation stage's and the alignment teacher's default wordings.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mllmfl_dist.data.base import DataError
from mllmfl_dist.data.labeled_shards import resolve_pattern
from mllmfl_dist.data.images import CorruptImageError, decode_image, image_to_array
from mllmfl_dist.data.shards import iter_samples
from mllmfl_dist.standins.web_captions import CATEGORY_NAMES, named_category

__all__ = [
    "DESCRIBE_REQUESTS",
    "QUESTION_REQUESTS",
    "llava_prompt",
    "corpus_shards",
    "read_caption_corpus",
    "instruction_pairs",
]

DESCRIBE_REQUESTS: tuple[str, ...] = (
    "Describe the image in one short sentence.",
    "Describe the image.",
    "Write a short caption for this picture.",
    "What is in this picture?",
)
QUESTION_REQUESTS: tuple[str, ...] = (
    "What is the object in the image?",
    "What item is shown?",
    "What kind of product is this?",
)


def llava_prompt(request: str) -> str:
    """llava-1.5's single-turn prompt with one image: `USER: <image>\\n{request} ASSISTANT:`."""
    return f"USER: <image>\n{request} ASSISTANT:"


def corpus_shards(pattern: str) -> list:
    """The shard paths of a corpus pattern (`expand_shards`; a relative pattern is also looked up from the
    repository root). Raises DataError naming the pattern when nothing matches."""
    try:
        return resolve_pattern(str(pattern), "--train")
    except DataError:
        raise DataError(
            f"--train {pattern}: no shard matches it (here or under the repository root); name "
            f"captioned WebDataset shards such as shards/fmnist_web"
        ) from None


def read_caption_corpus(pattern: str, limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Images (uint8 `[N, C, H, W]`, shard order) and captions of the captioned samples of `pattern` (a
    shard pattern, see `expand_shards`; a relative one is also looked up from the repository root).

    limit: keep only the first `limit` captioned samples. Raises DataError for a damaged shard, an image that
    does not decode, images of different sizes, or no captioned sample at all; a sample without `.txt` or
    without an image is skipped."""
    arrays: list[np.ndarray] = []
    captions: list[str] = []
    for path in corpus_shards(pattern):
        for sample in iter_samples(path):
            if limit is not None and len(captions) >= limit:
                break
            if sample["error"]:
                raise DataError(f"shard {path}, sample {sample['key']!r}: {sample['error']}")
            if sample["txt"] is None or sample["image_bytes"] is None:
                continue
            try:
                array = image_to_array(decode_image(sample["image_bytes"]))
            except CorruptImageError as err:
                raise DataError(f"shard {path}, sample {sample['key']!r}: {err}") from None
            if arrays and array.shape != arrays[0].shape:
                raise DataError(
                    f"shard {path}, sample {sample['key']!r}: image shape {array.shape} differs from "
                    f"the first one's {arrays[0].shape}"
                )
            arrays.append(array)
            captions.append(sample["txt"].strip())
    if not captions:
        raise DataError(f"no captioned sample (image + .txt) in {pattern}")
    return torch.from_numpy(np.stack(arrays)), captions


def instruction_pairs(captions: Sequence[str], seed: int) -> list[tuple[int, str, str]]:
    """`(image_index, prompt, answer)` for every caption's describe pair and, when the caption names a
    category, its question pair (answer: the category name of `web_captions.CATEGORY_NAMES`). Requests are
    drawn uniformly from `DESCRIBE_REQUESTS` / `QUESTION_REQUESTS` with `numpy.random.default_rng(seed)`.
    Order: all pairs of image 0, then image 1, ..."""
    rng = np.random.default_rng(seed)
    pairs: list[tuple[int, str, str]] = []
    for i, caption in enumerate(captions):
        describe = DESCRIBE_REQUESTS[int(rng.integers(len(DESCRIBE_REQUESTS)))]
        question = QUESTION_REQUESTS[int(rng.integers(len(QUESTION_REQUESTS)))]
        pairs.append((i, llava_prompt(describe), caption))
        named = named_category(caption)
        if named is not None:
            pairs.append((i, llava_prompt(question), CATEGORY_NAMES[named]))
    return pairs
