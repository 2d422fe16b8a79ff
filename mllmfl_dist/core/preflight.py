"""Start-up checks: what would otherwise fail later with a traceback (after files were written, or inside
NCCL) is refused here with one line, before anything is written or any process group starts.

Small pure functions over plain values (strings, counts, the environment), so that the config loader, the
runtime and a ``check CONFIG`` command ask the same questions:

* world: :func:`local_world_size` (how many ranks this node starts) and :func:`check_local_ranks` (NCCL
  needs a GPU of its own per rank);
* paths: :func:`expand_user`, :func:`path_text_problem` (control characters, NAME_MAX, PATH_MAX) and
  :func:`check_run_dir` (the output folder can be made where it is asked for);
* numbers: float32's range (used by :func:`mllmfl_dist.config.fields.float32_problem`) and
  :func:`data_memory_bytes` / :func:`check_data_memory` (the data arrays fit the machine).

Nothing here imports torch. Errors are :class:`ConfigError` (exit code 2).
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from mllmfl_dist.core.errors import ConfigError

if TYPE_CHECKING:  # config/ builds on core/ at run time; the type alone points back
    from mllmfl_dist.config.schema import DataConfig

FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max
FLOAT32_TINY = 1.1754943508222875e-38  # numpy.finfo(numpy.float32).tiny: the smallest normal number
# Linux's limits (limits.h), used where the file system cannot be asked (a path that does not exist yet).
NAME_MAX, PATH_MAX = 255, 4096
# Bytes a run adds below its run directory at most: compare/<method>/seed<k>/federated/ and the temporary
# name of an atomic write (.<name>.<8 chars>.tmp), with room for a long method name.
RUN_DIR_DEPTH_BYTES = 160
# URI and model-string prefixes after which a path stands (open_clip's local-dir:, MLflow's file:).
PATH_PREFIXES = ("local-dir:", "file:")
# Bytes per pixel while the synthetic source draws an array (data/synthetic.py render): 2 random bytes, the
# int8 noise, the int16 prototype gather and sum, and the uint8 result.
RENDER_BYTES_PER_PIXEL = 8
LABEL_BYTES = 8  # int64 per sample
# data/imagenet_lt.py's LIST_FILES, named again because that module imports torch (a test keeps them equal).
IMAGENET_LT_LISTS = ("ImageNet_LT_train.txt", "ImageNet_LT_test.txt")


# ------------------------------------------------------------------------------------------------ paths


def expand_user(value: str) -> str:
    """``~`` or ``~user`` at the start of ``value``, or after ``local-dir:`` / ``file:``, expanded."""
    for prefix in PATH_PREFIXES:
        if value.startswith(prefix) and value[len(prefix) :].startswith("~"):
            return prefix + os.path.expanduser(value[len(prefix) :])
    return os.path.expanduser(value) if value.startswith("~") else value


def control_characters(text: str) -> list[str]:
    """The control characters (Unicode category Cc: newline, tab, NUL, DEL, ...) in ``text``, as escapes."""
    return sorted({repr(c)[1:-1] for c in text if unicodedata.category(c) == "Cc"})


def path_text_problem(text: str, name_max: int = NAME_MAX, path_max: int = PATH_MAX) -> str | None:
    """Why ``text`` cannot be a path on this system (control characters, a component over ``name_max``
    bytes, the whole over ``path_max`` bytes), or None. Only the text is looked at."""
    bad = control_characters(text)
    if bad:
        return f"it holds control characters ({', '.join(bad)}); a path may not"
    encoded = os.fsencode(text)
    if len(encoded) >= path_max:
        return f"it is {len(encoded)} bytes long; paths end below {path_max} bytes (PATH_MAX)"
    longest = max(encoded.split(b"/"), key=len, default=b"")
    if len(longest) > name_max:
        return (
            f"a name in it is {len(longest)} bytes long ({os.fsdecode(longest[:24])}...); the file system "
            f"takes at most {name_max} (NAME_MAX)"
        )
    return None


def run_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a run directory's name, or None (the check of ``run.name``)."""
    if name in ("", ".", ".."):
        return "a non-empty name other than '.' or '..'"
    if "/" in name:
        return "a name without '/'"
    return path_text_problem(name)


def _limit(folder: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(folder, name)
    except (OSError, ValueError):
        return default


def check_run_dir(root: str, name: str) -> Path:
    """Refuse (ConfigError) a run directory ``<root>/<name>`` that cannot be made or written: an empty
    ``run.root`` (it would write into the working directory), a file in the way, a nearest existing folder
    that is read-only, names over the file system's NAME_MAX or a path over PATH_MAX. Only looks (stat,
    access, pathconf); creates nothing. Returns the absolute run directory."""
    if not root.strip():
        raise ConfigError(
            "run.root = '' is not allowed: outputs would go straight into the working directory; "
            'set a folder, e.g. run.root = "runs" (or "." to mean the working directory)'
        )
    run_dir = Path(os.path.abspath(Path(root) / name))
    existing = run_dir
    # os.path.exists, not Path.exists: a name over NAME_MAX makes stat fail with ENAMETOOLONG, checked below
    while not os.path.exists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "run.root" if existing == Path(os.path.abspath(root)) else f"{existing}, on the way to it,"
        raise ConfigError(
            f"run.root = {root!r}: {what} is a file, not a folder, so the run directory {run_dir} "
            f"cannot be made; point run.root at a folder"
        )
    if not os.access(existing, os.W_OK | os.X_OK) or _read_only(existing):
        raise ConfigError(
            f"run.root = {root!r}: {existing} is not writable, so the run directory {run_dir} "
            f"cannot be {'written' if existing == run_dir else 'made'}; point run.root elsewhere"
        )
    name_max = _limit(existing, "PC_NAME_MAX", NAME_MAX)
    for part in run_dir.relative_to(existing).parts:
        if len(os.fsencode(part)) > name_max:
            raise ConfigError(
                f"run.root / run.name: {part[:24]!r}... is {len(os.fsencode(part))} bytes; the file "
                f"system at {existing} takes names of at most {name_max} bytes; shorten it"
            )
    path_max = _limit(existing, "PC_PATH_MAX", PATH_MAX)
    if len(os.fsencode(str(run_dir))) + RUN_DIR_DEPTH_BYTES >= path_max:
        raise ConfigError(
            f"run.root / run.name: the run directory is {len(os.fsencode(str(run_dir)))} bytes long "
            f"and its files go up to {RUN_DIR_DEPTH_BYTES} bytes deeper, over PATH_MAX ({path_max}); "
            f"use a shorter run.root or run.name"
        )
    return run_dir


def free_disk_bytes(path: str | Path) -> int | None:
    """Free bytes for an unprivileged user on the file system of ``path`` (its nearest existing folder)."""
    existing = Path(os.path.abspath(path))
    while not os.path.exists(existing) and existing != existing.parent:
        existing = existing.parent
    try:
        stats = os.statvfs(existing)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------ world


def _tasks_per_node(text: str) -> list[int]:
    """Slurm's ``2(x3),1`` -> ``[2, 2, 2, 1]``; ValueError for anything else."""
    counts: list[int] = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", item)
        if not match:
            raise ValueError(text)
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def local_world_size(env: Mapping[str, str] | None = None) -> int:
    """How many ranks the launcher starts on this node: torchrun's ``LOCAL_WORLD_SIZE``, else an srun step's
    ``SLURM_STEP_TASKS_PER_NODE`` (this node's entry, by ``SLURM_NODEID``; the largest where that is
    missing), else ``SLURM_NTASKS_PER_NODE``, else 1 (one process)."""
    env = os.environ if env is None else env
    if env.get("LOCAL_WORLD_SIZE", "").strip().isdigit():
        return int(env["LOCAL_WORLD_SIZE"])
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        try:
            counts = _tasks_per_node(env[key])
        except (KeyError, ValueError):
            continue
        node = env.get("SLURM_NODEID", "")
        return counts[int(node)] if node.isdigit() and int(node) < len(counts) else max(counts)
    return 1


def local_ranks_problem(local_ranks: int, device_count: int, backend: str) -> str | None:
    """Why ``local_ranks`` ranks on a node with ``device_count`` visible GPUs cannot run ``backend``, or None:
    NCCL needs a GPU of its own per rank; the ranks would share ``cuda:{local_rank % device_count}`` and NCCL
    would fail later with "Duplicate GPU detected". ``backend`` is the resolved one (``gloo`` ranks may share
    a GPU or none)."""
    if backend != "nccl" or local_ranks <= device_count:
        return None
    return (
        f"{local_ranks} ranks on this node but {device_count} visible GPU(s), and dist.backend "
        f"'nccl' needs a GPU per rank; start at most {device_count} per node (torchrun "
        f"--nproc_per_node / srun --ntasks-per-node), make more GPUs visible (CUDA_VISIBLE_DEVICES), "
        f'or set dist.backend = "gloo"'
    )


def check_local_ranks(local_ranks: int, device_count: int, backend: str) -> None:
    """Refuse (ConfigError) what :func:`local_ranks_problem` names."""
    problem = local_ranks_problem(local_ranks, device_count, backend)
    if problem:
        raise ConfigError(problem)


# ----------------------------------------------------------------------------------------------- memory


def _lines(path: Path) -> int | None:
    try:
        with open(path, "rb") as handle:
            return sum(1 for line in handle if line.strip())
    except OSError:
        return None


def data_memory_bytes(data: DataConfig, num_clients: int) -> int | None:
    """Peak bytes one rank needs to hold the data of the ``[data]`` section ``data`` (a DataConfig), or None
    where it cannot be told before loading (fixed-size sources, shards, missing ImageNet-LT lists).

    synthetic, array: the train array (num_classes * samples_per_class images of channels * image_size^2
    uint8 pixels) and the test array, each drawn at :data:`RENDER_BYTES_PER_PIXEL` while it is made;
    on_demand: the test array and one client's samples. imagenet_lt: the uint8 cache of every listed image
    (3 * image_size^2 bytes each). Each adds the int64 labels and, for the partition, a num_clients x
    num_classes table of float64."""
    pixels = data.channels * data.image_size**2
    if data.source == "synthetic":
        test = data.num_classes * data.test_per_class
        train = data.num_classes * data.samples_per_class if data.synthetic_mode == "array" else data.samples_per_client
        kept = (train if data.synthetic_mode == "array" else 0) + test
        peak = max(RENDER_BYTES_PER_PIXEL * train * pixels, RENDER_BYTES_PER_PIXEL * test * pixels + kept * pixels)
        return peak + (train + test) * LABEL_BYTES + num_clients * data.num_classes * 8
    if data.source == "imagenet_lt":
        lists = Path(data.lists_dir or data.root)
        counts = [_lines(lists / name) for name in IMAGENET_LT_LISTS]
        if None in counts or not data.root:
            return None
        images = sum(count for count in counts if count is not None)
        return images * (3 * data.image_size**2 + LABEL_BYTES) + num_clients * 1000 * 8
    return None


def physical_memory_bytes() -> int | None:
    """The machine's memory (``SC_PHYS_PAGES`` pages), None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_data_memory(data: DataConfig, num_clients: int, memory: int | None, local_ranks: int = 1) -> None:
    """Refuse (ConfigError) data that cannot fit ``memory`` bytes when each of the node's ``local_ranks``
    builds its own copy (:func:`data_memory_bytes`)."""
    need = data_memory_bytes(data, num_clients)
    if need is None or memory is None or need * local_ranks <= memory:
        return
    ranks = f" x {local_ranks} ranks on this node" if local_ranks > 1 else ""
    raise ConfigError(
        f"the data needs about {need / 2**30:.3g} GiB{ranks} (data.source = {data.source!r}, "
        f"{_data_shape(data)}) but this machine has {memory / 2**30:.3g} GiB; reduce it"
    )


def _data_shape(data: DataConfig) -> str:
    if data.source == "synthetic":
        per = "samples_per_class" if data.synthetic_mode == "array" else "samples_per_client"
        return (
            f"num_classes {data.num_classes}, {per} {getattr(data, per)}, test_per_class "
            f"{data.test_per_class}, channels {data.channels}, image_size {data.image_size}"
        )
    return f"image_size {data.image_size}"


# --------------------------------------------------------------------------------------------- Ctrl-C


def interrupted_message(what: str) -> str:
    """The one line for a command (``what``: "federate configs/x.toml") stopped by Ctrl-C (SIGINT)."""
    return (
        f"interrupted (SIGINT) during {what}; checkpoints already written are kept: rerun the same command to "
        f"resume from the last one"
    )
