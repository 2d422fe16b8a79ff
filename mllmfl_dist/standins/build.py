"""The stand-ins' directory: `build_tiny_models(directory)` writes the random tiny models (:mod:`.tiny`) or the
trained ones (:mod:`.trained`) into `<directory>/llava/` and `<directory>/clip/`.

A manifest (`tiny_models.json`, with `"trained": false` or `true`) is written last and lists every file of
the build with its size and modification time; a directory holding the manifest of the build asked for,
whose files still match it, is complete and is returned as it is (the build is idempotent and cheap to call
at the start of every stage). A half-written build (no manifest), one of another kind, corpus or settings,
or one whose files were truncated or replaced since (a power loss, a hand edit), is rebuilt from scratch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from mllmfl_dist.core.checkpoint import file_identity, remove_stale_temps, same_file, write_text_atomic
from mllmfl_dist.core.locks import exclusive
from mllmfl_dist.standins.standin_settings import StandinSettings
from mllmfl_dist.standins.tiny import (
    CLIP_IMAGE_SIZE,
    LLAVA_IMAGE_SIZE,
    LLAVA_PATCH_SIZE,
    SEED,
    build_random_clip,
    build_random_llava,
)
from mllmfl_dist.standins.trained import build_trained, corpus_identity

MANIFEST = "tiny_models.json"
MODEL_CARD = "model_card.json"  # the trained build's measurements, beside llava/ and clip/
# Bump when the tiny architectures or the tokenizer change, so stale builds are rebuilt.
TINY_VERSION = 2  # bump when the built models change, so old directories are rebuilt
TRAINED_VERSION = 1  # the same for the trained build (`--train`)


def _files(directory: Path, paths: dict[str, Path]) -> dict[str, dict[str, int]]:
    """``{relative path: file_identity}`` of every file of the built models, each synced to disk first (the
    libraries' save_pretrained does not), so the manifest never describes files a power loss can still cut."""
    files = {}
    for path in paths.values():
        for f in sorted(path.rglob("*")):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                files[str(f.relative_to(directory))] = file_identity(f)
    return files


def _identity(train: str | None, settings) -> dict:
    """What a reusable directory's manifest must say: the random build's version, or the trained build's
    version, corpus bytes (sha256) and training settings."""
    if train is None:
        return {"version": TINY_VERSION, "trained": False}
    return {
        "version": TRAINED_VERSION,
        "trained": True,
        "corpus_sha256": corpus_identity(train)["sha256"],
        "settings": dataclasses.asdict(settings),
    }


def _manifest_ok(directory: Path, identity: dict) -> bool:
    """The manifest is the build asked for, and every file it lists is still the one it describes."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or any(manifest.get(key) != value for key, value in identity.items()):
        return False
    files = manifest.get("files")
    return (
        isinstance(files, dict)
        and bool(files)
        and all(same_file(directory / name, described) for name, described in files.items())
    )


def build_tiny_models(
    directory: str | os.PathLike, *, train: str | None = None, settings=None, progress: bool = True
) -> dict[str, Path]:
    """Write a tiny LLaVA to `<directory>/llava` and a tiny open_clip CLIP to `<directory>/clip`; return
    `{"llava": path, "clip": path}`.

    train: None builds random, seeded models in a second (for fast tests). A shard pattern of a captioned
    corpus (e.g. `shards/fmnist_web`) trains knowledge-bearing stand-ins on it instead
    (`mllmfl_dist.standins.trained`, minutes on a CPU) and writes `<directory>/model_card.json` with what they
    measured. settings: a `StandinSettings` for the trained build (default: the shipped one). progress: tqdm
    bars on stderr while training (pass False on ranks other than 0).

    Idempotent: a directory whose manifest (written last) says the build is complete and is the one asked for
    (random, or trained on a corpus with the same bytes and the same settings) is returned without touching a
    file. Otherwise the models are written to temporary sibling directories and renamed into place, then the
    manifest is written, so an interrupted build never looks complete. Processes building the same directory
    at once (ranks of one job) serialise on a lock file; the later ones find the build done. Raises DataError
    when the corpus pattern matches nothing.
    """
    directory = Path(directory)
    settings = StandinSettings() if settings is None else settings
    paths = {"llava": directory / "llava", "clip": directory / "clip"}
    identity = _identity(train, settings)
    if _manifest_ok(directory, identity):
        return paths
    directory.mkdir(parents=True, exist_ok=True)
    with exclusive(directory / ".build.lock"):
        if not _manifest_ok(directory, identity):
            _build(directory, paths, identity, train, settings, progress)
    return paths


def _build(
    directory: Path, paths: dict[str, Path], identity: dict, train: str | None, settings, progress: bool
) -> None:
    (directory / MANIFEST).unlink(missing_ok=True)
    (directory / MODEL_CARD).unlink(missing_ok=True)
    remove_stale_temps(directory, targets=[MANIFEST, MODEL_CARD])
    # Under the lock no other build runs: partial directories left here belong to killed builds.
    for stale in directory.glob(".*.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmps = {name: directory / f".{name}.partial-{os.getpid()}" for name in paths}
    card = None
    try:
        for tmp in tmps.values():
            tmp.mkdir()
        if train is None:
            build_random_llava(tmps["llava"])
            build_random_clip(tmps["clip"])
        else:
            card = build_trained(tmps, train, settings, progress=progress)
        for name, tmp in tmps.items():
            if paths[name].exists():
                shutil.rmtree(paths[name])
            tmp.rename(paths[name])
    finally:
        for tmp in tmps.values():
            if tmp.exists():
                shutil.rmtree(tmp)
    manifest = {**identity, "models": {name: path.name for name, path in paths.items()}}
    if card is None:
        manifest["llava"] = {"image_size": LLAVA_IMAGE_SIZE, "patch_size": LLAVA_PATCH_SIZE, "seed": SEED}
        manifest["clip"] = {"image_size": CLIP_IMAGE_SIZE, "seed": SEED + 1}
    else:
        write_text_atomic(directory / MODEL_CARD, json.dumps(card, indent=2))
        manifest["corpus"] = train
        manifest["model_card"] = MODEL_CARD
    manifest["files"] = _files(directory, paths)
    write_text_atomic(directory / MANIFEST, json.dumps(manifest, indent=2))
