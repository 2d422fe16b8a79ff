"""Alt-text-like captions for the web-like Fashion-MNIST image-text corpus (`shards/fmnist_web/`).

The corpus stands in for the web image-text pairs a CLIP or LLaVA is trained on: each image gets a short
shop-listing caption that names its garment with one of several synonyms ("trainers", "running shoes",
"leather booties", ...) inside one of many templates, and, as web alt-text does, some captions name no
garment at all ("new arrival, free shipping") and some name the wrong one (a mislabeled listing).

- `CATEGORY_NAMES`: the garment categories, in Fashion-MNIST's class order (the corpus has no labels; the
  categories are what a caption can name).
- `SYNONYMS[c]`: the phrases that name category c in captions.
- `make_caption(rng, label, wrong_fraction, no_class_fraction)` -> `(caption, named, kind)`: the caption of
  an image of class `label`, the category it names (None for none) and `kind` in `CAPTION_KINDS`.
- `named_category(caption)` -> the category a caption names, or None: the longest synonym phrase found on
  word boundaries (so "shirt" is not read inside "t-shirt" or "sweatshirt"). This is the caption parser
  that turns captions into question-answer pairs for the LLaVA stand-in (as LLaVA derives its instruction
  data from captions) and that scores generated captions in the model card.
- `reversed_tail_counts(n_max, factor, num_classes)`: the corpus's class mix, a long tail whose head is the
  LAST class (the clients' long tail has class 0 as head and class 9 as tail).

Pure functions of their arguments; the randomness comes from the `numpy.random.Generator` passed in.
"""

from __future__ import annotations

import re

import numpy as np

__all__ = [
    "CATEGORY_NAMES",
    "SYNONYMS",
    "TEMPLATES",
    "NO_CLASS_CAPTIONS",
    "CAPTION_KINDS",
    "make_caption",
    "named_category",
    "reversed_tail_counts",
]

CATEGORY_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

# Lower-case phrases; each names exactly one category. The category name itself (lower-cased, singular)
# is among them, so a zero-shot prompt with the class name reads like some captions.
SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("t-shirt", "tee", "top", "tank top", "graphic tee", "crew neck t-shirt"),
    ("trouser", "trousers", "pants", "jeans", "slacks", "chinos", "leggings"),
    ("pullover", "sweater", "jumper", "knit sweater", "sweatshirt", "wool pullover"),
    ("dress", "summer dress", "maxi dress", "sundress", "evening gown", "midi dress"),
    ("coat", "jacket", "winter coat", "parka", "trench coat", "padded jacket"),
    ("sandal", "sandals", "flip-flops", "strappy sandals", "slides", "heeled sandals"),
    ("shirt", "button-down shirt", "blouse", "flannel shirt", "dress shirt", "polo shirt"),
    ("sneaker", "sneakers", "trainers", "running shoes", "tennis shoes", "athletic shoes"),
    ("bag", "handbag", "tote bag", "backpack", "purse", "shoulder bag", "clutch"),
    ("ankle boot", "ankle boots", "leather booties", "chelsea boots", "booties", "heeled ankle boots"),
)

# {item} is a synonym, {adj} an adjective. No template word is itself a synonym phrase (tested).
TEMPLATES: tuple[str, ...] = (
    "{item}",
    "{adj} {item}",
    "a photo of a {item}",
    "{adj} {item} for sale",
    "{item} for sale",
    "new {adj} {item}, free shipping",
    "buy {adj} {item} online",
    "women's {adj} {item}",
    "men's {item} in {adj} style",
    "{item}, size m",
    "cheap {item} - best price",
    "our {adj} {item} is back in stock",
    "{adj} {item} from the spring collection",
    "vintage {item}, good condition",
    "product photo: {adj} {item}",
    "{item} on a white background",
    "the perfect {item} for every day",
    "designer {item}, limited edition",
)
ADJECTIVES: tuple[str, ...] = (
    "black", "white", "grey", "dark", "light", "cotton", "casual", "classic", "slim", "oversized", "striped",
    "plain", "soft", "comfortable", "stylish", "cheap",
)  # fmt: skip

# Alt-text that names no garment.
NO_CLASS_CAPTIONS: tuple[str, ...] = (
    "new arrival, free shipping",
    "click to see more",
    "product image 1 of 4",
    "summer collection 2017",
    "sale! 50% off today",
    "image not available",
    "best seller this week",
    "shop now and save",
    "limited stock, order today",
    "free returns within 30 days",
)

CAPTION_KINDS = ("true_class", "wrong_class", "no_class")


def make_caption(
    rng: np.random.Generator, label: int, wrong_fraction: float = 0.1, no_class_fraction: float = 0.1
) -> tuple[str, int | None, str]:
    """A caption for an image of category `label`.

    With probability `no_class_fraction` the caption names no category (kind `no_class`, named None); else
    with probability `wrong_fraction` (of all captions) it names a category drawn uniformly from the other
    ones (`wrong_class`); else it names `label` (`true_class`). The named category is written with a
    synonym drawn uniformly from `SYNONYMS[named]`, inside a uniformly drawn template and adjective.
    Returns `(caption, named, kind)`. Raises ValueError when the fractions are negative or sum above 1, or
    `label` is not a category.
    """
    if not 0 <= label < len(CATEGORY_NAMES):
        raise ValueError(f"label {label} is not a category index (0..{len(CATEGORY_NAMES) - 1})")
    if wrong_fraction < 0 or no_class_fraction < 0 or wrong_fraction + no_class_fraction > 1:
        raise ValueError(
            f"fractions must be >= 0 and sum to <= 1, got wrong {wrong_fraction}, no class {no_class_fraction}"
        )
    # One draw decides the kind, and the other draws happen whatever the kind, so the stream of random
    # numbers (hence every other caption) does not depend on the fractions' rounding.
    u = rng.random()
    other = int(rng.integers(len(CATEGORY_NAMES) - 1))
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    adjective = ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]
    synonym_draw = rng.random()
    no_class = NO_CLASS_CAPTIONS[int(rng.integers(len(NO_CLASS_CAPTIONS)))]
    if u < no_class_fraction:
        return no_class, None, "no_class"
    if u < no_class_fraction + wrong_fraction:
        named, kind = other + (other >= label), "wrong_class"
    else:
        named, kind = label, "true_class"
    synonyms = SYNONYMS[named]
    item = synonyms[min(int(synonym_draw * len(synonyms)), len(synonyms) - 1)]
    return template.format(item=item, adj=adjective), named, kind


def _phrase_pattern() -> tuple[re.Pattern[str], dict[str, int]]:
    # Rebuilt per call (a few dozen phrases; `re` caches the compiled pattern), so the module holds no state.
    owner = {phrase: c for c, phrases in enumerate(SYNONYMS) for phrase in phrases}
    if len(owner) != sum(len(p) for p in SYNONYMS):
        raise AssertionError("a synonym names two categories")
    # Longest first, so "tank top" wins over "top" and "dress shirt" over "dress"; a phrase may not touch a
    # letter, digit or hyphen on either side ("shirt" inside "t-shirt" is not a match).
    alternatives = "|".join(re.escape(p) for p in sorted(owner, key=len, reverse=True))
    return re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])"), owner


def named_category(caption: str) -> int | None:
    """The category index the caption names: the leftmost synonym phrase (longest at that place), matched
    case-insensitively on word boundaries; None when it names none."""
    pattern, owner = _phrase_pattern()
    match = pattern.search(caption.lower())
    return None if match is None else owner[match.group(0)]


def reversed_tail_counts(n_max: int, factor: float, num_classes: int = len(CATEGORY_NAMES)) -> list[int]:
    """Images per class of the corpus: class c gets `int(n_max * factor ** ((C - 1 - c) / (C - 1)))`, the
    package's long-tail rule with the order reversed, so the last class is the head (n_max) and class 0 the
    tail (n_max * factor)."""
    if n_max < 1 or not 0 < factor <= 1 or num_classes < 2:
        raise ValueError(f"need n_max >= 1, 0 < factor <= 1, num_classes >= 2; got {n_max}, {factor}, {num_classes}")
    return [int(n_max * factor ** ((num_classes - 1 - c) / (num_classes - 1))) for c in range(num_classes)]
