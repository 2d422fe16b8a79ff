"""The web-like image-text corpus (`shards/fmnist_web/`): caption maker and parser, class mix, the shipped
shards (unlabeled, disjoint from every other shipped set, as documented) and their byte-identical rebuild."""

import hashlib
import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mllmfl_dist.data.base import DataError
from mllmfl_dist.data.shards import expand_shards, iter_samples
from mllmfl_dist.standins.web_captions import (
    ADJECTIVES,
    CATEGORY_NAMES,
    NO_CLASS_CAPTIONS,
    SYNONYMS,
    TEMPLATES,
    make_caption,
    named_category,
    reversed_tail_counts,
)
from mllmfl_dist.standins.standin_data import instruction_pairs, llava_prompt

SHIPPED = Path(__file__).resolve().parents[1] / "shards"
WEB = SHIPPED / "fmnist_web"
# The arguments shards/build.sh passes (its last command).
BUILD_ARGS = [
    "--indices",
    "50000:59488",
    "--exclude",
    str(SHIPPED / "fmnist_align" / "align-*.tar.gz"),
    "--n-max",
    "950",
    "--mix-factor",
    "0.4",
    "--wrong-fraction",
    "0.1",
    "--no-class-fraction",
    "0.1",
    "--seed",
    "0",
    "--prefix",
    "web",
    "--max-count",
    "1000",
]


def fashion_mnist():
    from mllmfl_dist.data.sources import load_fashion_mnist

    try:
        return load_fashion_mnist("")
    except DataError:
        pytest.skip("Fashion-MNIST raw files not installed (apt-get install dataset-fashion-mnist)")


@pytest.mark.parametrize("caption, category", [
    ("grey t-shirt for sale", 0), ("a photo of a tank top", 0), ("crew neck t-shirt", 0),
    ("vintage dress shirt, good condition", 6), ("summer dress", 3), ("new sweatshirt", 2),
    ("women's shirt", 6), ("ankle boots", 9), ("leather booties for sale", 9), ("a photo of a Sneaker.", 7),
    ("Ankle boot", 9), ("T-shirt/top", 0), ("handbag on a white background", 8),
    ("new arrival, free shipping", None), ("best seller this week", None), ("a topless photo", None),
])  # fmt: skip
def test_named_category_reads_the_longest_phrase_on_word_boundaries(caption, category):
    assert named_category(caption) == category


def test_every_template_with_every_synonym_parses_to_its_category():
    for template, adjective in itertools.product(TEMPLATES, ADJECTIVES):
        for c, synonyms in enumerate(SYNONYMS):
            for item in synonyms:
                caption = template.format(item=item, adj=adjective)
                assert named_category(caption) == c, caption
    assert all(named_category(text) is None for text in NO_CLASS_CAPTIONS)
    # The category names themselves (as class names reach the CLIP and LLaVA teachers) are read too.
    assert [named_category(name) for name in CATEGORY_NAMES] == list(range(10))


def test_make_caption_noise_fractions_and_wrong_classes():
    rng = np.random.default_rng(0)
    made = [(label, *make_caption(rng, label, 0.1, 0.15)) for label in rng.integers(0, 10, 20000).tolist()]
    kinds = Counter(kind for _, _, _, kind in made)
    assert abs(kinds["no_class"] / 20000 - 0.15) < 0.01 and abs(kinds["wrong_class"] / 20000 - 0.1) < 0.01
    for label, caption, named, kind in made:
        assert named_category(caption) == named
        assert (named is None) == (kind == "no_class")
        assert (named == label) == (kind == "true_class")
    wrong = Counter(named for label, _, named, kind in made if kind == "wrong_class" and label == 3)
    assert set(wrong) == set(range(10)) - {3}  # every other class, never the true one
    assert len({caption for _, caption, _, _ in made}) > 2000  # varied, not a handful of strings
    with pytest.raises(ValueError):
        make_caption(rng, 10)
    with pytest.raises(ValueError):
        make_caption(rng, 0, 0.6, 0.5)


def test_reversed_tail_counts():
    counts = reversed_tail_counts(950, 0.4)
    assert counts[-1] == 950 and counts[0] == int(950 * 0.4) and counts == sorted(counts)
    with pytest.raises(ValueError):
        reversed_tail_counts(0, 0.4)


def test_instruction_pairs_derive_questions_from_captions():
    captions = ["black trainers for sale", "new arrival, free shipping", "a photo of a leather booties"]
    pairs = instruction_pairs(captions, seed=0)
    by_image = {i: [(p, a) for j, p, a in pairs if j == i] for i in range(3)}
    assert [len(v) for v in by_image.values()] == [2, 1, 2]  # no question from a caption naming nothing
    assert by_image[0][0][1] == captions[0] and by_image[0][1][1] == "Sneaker"
    assert by_image[2][1][1] == "Ankle boot"
    assert all(p.startswith("USER: <image>\n") and p.endswith(" ASSISTANT:") for p, _ in by_image[0])
    assert instruction_pairs(captions, seed=0) == pairs
    question = "What is the object in the image?"
    assert llava_prompt(question) == f"USER: <image>\n{question} ASSISTANT:"


def _web_samples():
    return [s for p in expand_shards(str(WEB)) for s in iter_samples(p)]


def _indices(pattern: str) -> set[int]:
    return {s["json"]["index"] for p in expand_shards(str(SHIPPED / pattern)) for s in iter_samples(p)}


def test_shipped_corpus_is_unlabeled_small_and_disjoint_from_every_other_set():
    samples = _web_samples()
    assert len(samples) == 6264
    assert not (WEB / "classes.json").exists()
    assert all(s["cls"] is None and s["txt"] and s["image_bytes"] for s in samples)
    assert all(set(s["json"]) == {"source", "split", "index", "caption"} for s in samples)  # no class name
    index = [s["json"]["index"] for s in samples]
    assert len(set(index)) == len(index) and all(s["json"]["split"] == "train" for s in samples)
    assert all(50000 <= i < 59488 for i in index)
    web = set(index)
    for other in ("fmnist_align/align-*.tar.gz", "pool/pool-*.tar.gz", "fmnist_lt/train-*.tar.gz"):
        assert not web & _indices(other), other
    assert sum(p.stat().st_size for p in WEB.iterdir()) < 4e6
    kinds = Counter(s["json"]["caption"] for s in samples)
    assert 0.08 < kinds["wrong_class"] / len(samples) < 0.12 and 0.08 < kinds["no_class"] / len(samples) < 0.12


def test_shipped_corpus_captions_and_class_mix_match_the_raw_labels():
    fmnist = fashion_mnist()
    labels = np.asarray(fmnist.train_labels)
    samples = _web_samples()
    counts = np.bincount([labels[s["json"]["index"]] for s in samples], minlength=10).tolist()
    assert counts == reversed_tail_counts(950, 0.4)  # the head is the clients' tail class (9)
    for s in samples:
        named, label = named_category(s["txt"]), int(labels[s["json"]["index"]])
        assert {"true_class": named == label, "wrong_class": named not in (None, label), "no_class": named is None}[
            s["json"]["caption"]
        ], s["txt"]


def test_rebuilding_the_corpus_gives_the_shipped_bytes(tmp_path):
    from mllmfl_dist.commands.web_corpus import main

    fashion_mnist()
    assert main([*BUILD_ARGS, "--out", str(tmp_path / "web")]) == 0
    rebuilt = sorted((tmp_path / "web").iterdir())
    shipped = sorted(WEB.iterdir())
    assert [p.name for p in rebuilt] == [p.name for p in shipped]
    for a, b in zip(rebuilt, shipped):
        assert hashlib.sha256(a.read_bytes()).hexdigest() == hashlib.sha256(b.read_bytes()).hexdigest(), a.name


def test_corpus_cli_user_errors(tmp_path, capsys):
    from mllmfl_dist.commands.web_corpus import main

    fashion_mnist()
    assert main(["--out", str(tmp_path), "--wrong-fraction", "0.7", "--no-class-fraction", "0.5"]) == 2
    assert "--no-class-fraction must be <= 1" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--n-max", "5000"]) == 2
    assert "lower --n-max" in capsys.readouterr().err
