"""The knowledge-bearing MLLM stand-ins: a CLIP and a LLaVA trained here on a captioned corpus.

`python -m mllmfl_dist tiny-models DIR --train shards/fmnist_web` (`build.build_tiny_models(DIR, train=...)`,
which owns the caching: a finished directory is reused, a half-written one rebuilt, concurrent builds
serialise) calls `build_trained(dirs, corpus, settings)`, which

1. reads the corpus (`standin_data.read_caption_corpus`; images and captions, no labels);
2. trains the CLIP contrastively with open_clip's model and `ClipLoss` (`clip_train`) and saves it where
   `open_clip.create_model_and_transforms("local-dir:DIR/clip")` loads it;
3. trains the LLaVA on that CLIP's frozen image tower (`llava_train`) and saves it where
   `LlavaForConditionalGeneration.from_pretrained` / `AutoProcessor.from_pretrained` (`mllm.load_llava`) load it;
4. measures both through those loading paths on the shipped balanced test shards (`model_card`) and returns
   the model card: the measurements plus corpus, seed, settings, steps, wall times and the machine's load,
   `"trained": true`.

Everything runs on the CPU with `settings.threads` intra-op threads; the result is a function of the corpus,
the settings and the thread count.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path

import torch

from mllmfl_dist.standins.standin_settings import StandinSettings
from mllmfl_dist.standins.standin_data import corpus_shards, read_caption_corpus
from mllmfl_dist.data.labeled_shards import resolve_pattern
from mllmfl_dist.data.shards import read_classes
from mllmfl_dist.standins.clip_train import save_open_clip, train_clip
from mllmfl_dist.standins.llava_train import train_llava
from mllmfl_dist.standins.model_card import measure_standins
from mllmfl_dist.standins.tiny import CLIP_CONFIG, CLIP_PREPROCESS, save_llava

__all__ = ["CARD_TEST_SHARDS", "corpus_identity", "build_trained"]

CARD_TEST_SHARDS = "shards/fmnist_lt/test-*.tar.gz"  # the shipped balanced test set (100 per class)


def corpus_identity(pattern: str) -> dict:
    """`{"pattern", "shards", "sha256"}` of a corpus: its shard file names and one sha256 over their bytes
    (so a rebuilt, byte-identical corpus has the same identity). Raises DataError when nothing matches."""
    paths = corpus_shards(pattern)
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes())
    return {"pattern": pattern, "shards": [p.name for p in paths], "sha256": digest.hexdigest()}


def build_trained(dirs: dict[str, Path], corpus: str, settings: StandinSettings, *, progress: bool = True) -> dict:
    """Train and save the CLIP into `dirs["clip"]` and the LLaVA into `dirs["llava"]` (existing, empty
    directories); returns the model card (a JSON-serialisable dict). See the module docstring."""
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        started = time.perf_counter()
        load_start = os.getloadavg()
        images, captions = read_caption_corpus(corpus, settings.limit)
        clip, clip_stats = train_clip(
            images,
            captions,
            CLIP_CONFIG,
            CLIP_PREPROCESS,
            epochs=settings.clip_epochs,
            batch_size=settings.clip_batch_size,
            lr=settings.clip_lr,
            weight_decay=settings.clip_weight_decay,
            seed=settings.seed,
            progress=progress,
        )
        save_open_clip(clip, CLIP_CONFIG, CLIP_PREPROCESS, dirs["clip"])
        clip_seconds = time.perf_counter() - started
        llava, tokenizer, llava_stats = train_llava(clip, CLIP_CONFIG, images, captions, settings, progress=progress)
        save_llava(llava, tokenizer, dirs["llava"])
        train_seconds = time.perf_counter() - started
        del clip, llava
        test_paths = resolve_pattern(CARD_TEST_SHARDS, "model card test shards")
        class_names = read_classes(test_paths[0].parent)
        measured = measure_standins(
            dirs["clip"],
            dirs["llava"],
            CARD_TEST_SHARDS,
            class_names,
            per_class=settings.card_per_class,
            progress=progress,
        )
        card_seconds = time.perf_counter() - started - train_seconds
        load_end = os.getloadavg()
    finally:
        torch.set_num_threads(threads)
    return {
        "trained": True,
        "corpus": {**corpus_identity(corpus), "samples_used": len(captions)},
        "seed": settings.seed,
        "settings": dataclasses.asdict(settings),
        "clip": {"steps": clip_stats["steps"], "final_loss": clip_stats["final_loss"], "seconds": clip_seconds},
        "llava": {**llava_stats, "seconds": train_seconds - clip_seconds},
        "train_seconds": train_seconds,
        "card_seconds": card_seconds,
        # Wall times depend on what else the machine runs: its 1/5/15-minute load averages and CPU count.
        "machine": {
            "cpus": os.cpu_count(),
            "threads": settings.threads,
            "load_average_start": list(load_start),
            "load_average_end": list(load_end),
        },
        "measured": measured,
    }
