"""Where a model's files are and what they hold, read without loading a weight: the ``check`` command's model rows.

* Hugging Face models (LLaVA, ``hf-hub:`` CLIP): a local directory, or a hub id found in the local Hugging Face
  cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``; the layout
  ``models--org--name/snapshots/<revision>/`` with ``refs/main`` naming the revision, as ``huggingface_hub``
  writes it). The parameter count and dtype come from the safetensors files' JSON headers (the format's first
  8 bytes are the header's length, little-endian; the header maps each tensor to ``dtype``, ``shape`` and byte
  offsets: https://github.com/huggingface/safetensors#format), listed by ``model.safetensors.index.json``
  where there are several.
* open_clip names: ``local-dir:DIR``, ``hf-hub:org/repo``, or an architecture with a pretrained tag, whose
  weights open_clip fetches from the hub repo or URL of its pretrained table (read from open_clip's source with
  :mod:`ast`, so open_clip, which imports torch and timm, is not imported).

Nothing here imports torch, transformers or open_clip.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

# Bytes per element of the safetensors dtypes (the format's names).
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
TORCH_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit on a header
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
LOCAL_DIR, HF_HUB = "local-dir:", "hf-hub:"


@dataclass
class ModelFiles:
    """What was found for one model name: ``where`` (a folder, or what was looked for), ``found``, the
    parameter count and dtypes of its weights (None when they cannot be read), its config.json, and
    ``problem``: one line on what is missing, or None."""

    name: str
    kind: str  # llava | open_clip
    where: str = ""
    found: bool = False
    params: int | None = None
    dtypes: list[str] = field(default_factory=list)
    weight_bytes: int | None = None
    config: dict = field(default_factory=dict)
    problem: str | None = None

    def bytes_at(self, element_bytes: int | None) -> int | None:
        """The weights' bytes at ``element_bytes`` per parameter (None: as stored)."""
        if element_bytes is None:
            return self.weight_bytes
        return None if self.params is None else self.params * element_bytes


def looks_like_local_path(model: str) -> bool:
    """True when `model` names a local directory rather than a hub id (`org/name`): it exists, or is absolute,
    starts with `.` or `~`, or has more than one path separator."""
    if os.path.exists(os.path.expanduser(model)):
        return True
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or model.count("/") > 1
        or (os.sep != "/" and os.sep in model)
    )


def hf_cache_dir(env: dict[str, str] | None = None) -> Path:
    """The Hugging Face hub cache ``huggingface_hub`` reads: ``$HF_HUB_CACHE``, ``$HF_HOME/hub``, or
    ``$XDG_CACHE_HOME/huggingface/hub`` (default ``~/.cache``)."""
    env = os.environ if env is None else env
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return Path(env.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "huggingface" / "hub"


def hub_snapshot(repo_id: str, cache: Path | None = None) -> Path | None:
    """The cached snapshot folder of hub model ``repo_id``: the revision ``refs/main`` names, else the newest
    snapshot holding a config file; None when the cache has none."""
    repo = (cache or hf_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = (
        sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
        if (repo / "snapshots").is_dir()
        else []
    )
    for snapshot in snapshots:
        if any((snapshot / name).is_file() for name in ("config.json", "open_clip_config.json")):
            return snapshot
    return snapshots[0] if snapshots else None


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets); ValueError when the
    file is not one."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (size,) = struct.unpack("<Q", head)
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"header length {size} is not plausible")
        text = handle.read(size)
    if len(text) < size:
        raise ValueError("truncated header")
    return json.loads(text)


def read_weights(folder: Path, files: list[str], info: ModelFiles) -> None:
    """Fill ``info`` (params, dtypes, bytes) from the safetensors headers of ``files`` in ``folder``; a
    missing or unreadable file sets ``info.problem``. ``.bin`` files are counted by size only."""
    params: int | None = 0
    dtypes, total = set(), 0
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        info.problem = (
            f"{len(missing)} of {len(files)} weight files missing in {folder} ({missing[0]}, ...): an "
            f"interrupted download; download it again"
        )
        return
    for name in files:
        path = folder / name
        total += path.stat().st_size
        if not name.endswith(".safetensors"):
            params = None  # a pickle's tensor count cannot be read without unpickling it
            continue
        try:
            header = safetensors_header(path)
        except (OSError, ValueError) as err:
            info.problem = f"{path}: not a readable safetensors file ({err}); download it again"
            return
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for dim in entry["shape"]:
                count *= dim
            if params is not None:
                params += count
            dtypes.add(entry["dtype"])
    info.params, info.dtypes, info.weight_bytes = params, sorted(dtypes), total


def hf_model_files(folder: Path) -> tuple[list[str], str | None]:
    """The weight files of a ``save_pretrained`` folder (from its safetensors index, else its
    ``*.safetensors`` files, else ``pytorch_model*.bin``) and a problem line, or None."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            return sorted(set(json.loads(index.read_text())["weight_map"].values())), None
        except (OSError, ValueError, KeyError) as err:
            return [], f"{index}: unreadable ({err}); download it again"
    files = sorted(p.name for p in folder.glob("*.safetensors")) or sorted(p.name for p in folder.glob("*.bin"))
    return files, None if files else f"no weight files (*.safetensors, *.bin) in {folder}"


def find_hf_model(name: str, kind: str = "llava", cache: Path | None = None) -> ModelFiles:
    """Resolve ``name`` (a local ``save_pretrained`` directory or a hub id) without loading it."""
    info = ModelFiles(name, kind)
    if looks_like_local_path(name):
        folder = Path(name).expanduser()
        info.where = str(folder)
        if not (folder / "config.json").is_file():
            info.problem = (
                f"model {name!r}: {'no config.json in' if folder.is_dir() else 'no directory'} "
                f"{folder}; point it at a save_pretrained directory"
            )
            return info
    else:
        cache = cache or hf_cache_dir()
        snapshot = hub_snapshot(name, cache)
        info.where = str(snapshot) if snapshot else f"{cache} (not cached)"
        if snapshot is None or not (snapshot / "config.json").is_file():
            info.problem = (
                f"model {name!r} is not in the Hugging Face cache {cache}; download it once with "
                f"`huggingface-cli download {name}` (or set HF_HOME / HF_HUB_CACHE to the cache "
                f"that holds it)"
            )
            return info
        folder = snapshot
    try:
        info.config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        info.problem = f"model {name!r}: {folder / 'config.json'} is unreadable ({err})"
        return info
    files, info.problem = hf_model_files(folder)
    if info.problem is None:
        read_weights(folder, files, info)
    info.found = info.problem is None
    return info


def open_clip_pretrained(arch: str, tag: str) -> dict | None:
    """``{"hf_hub": ..., "url": ...}`` of open_clip's pretrained table for ``arch`` / ``tag``, read from the
    installed open_clip's ``pretrained.py`` with :mod:`ast`; None where it has no such entry or cannot be read."""
    spec = importlib.util.find_spec("open_clip")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        tree = ast.parse((Path(spec.submodule_search_locations[0]) / "pretrained.py").read_text())
    except (OSError, SyntaxError):
        return None
    tables: dict[str, dict] = {}  # _VITB32 = dict(openai=_pcfg(url=..., hf_hub=...), ...)
    names: dict[str, str] = {}  # _PRETRAINED = {"ViT-B-32": _VITB32, ...}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        target, value = node.targets[0].id, node.value
        if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "dict":
            tables[target] = {
                kw.arg: {k.arg: k.value.value for k in kw.value.keywords if isinstance(k.value, ast.Constant)}
                for kw in value.keywords
                if kw.arg and isinstance(kw.value, ast.Call)
            }
        elif isinstance(value, ast.Dict):
            for key, item in zip(value.keys, value.values):
                if isinstance(key, ast.Constant) and isinstance(item, ast.Name):
                    names[key.value] = item.id
    table = tables.get(names.get(arch, ""), {})
    return table.get(tag.lower().replace("-", "_")) or table.get(tag)


def find_open_clip(model: str, pretrained: str = "", cache: Path | None = None) -> ModelFiles:
    """Resolve an open_clip model name (``local-dir:DIR``, ``hf-hub:org/repo``, or an architecture with
    ``pretrained``) to its weights on this machine, without importing open_clip."""
    info = ModelFiles(model, "open_clip")
    cache = cache or hf_cache_dir()
    if model.startswith((LOCAL_DIR, HF_HUB)):
        if model.startswith(LOCAL_DIR):
            folder: Path | None = Path(model[len(LOCAL_DIR) :]).expanduser()
        else:
            folder = hub_snapshot(model[len(HF_HUB) :], cache)
        info.where = str(folder) if folder else f"{cache} (not cached)"
        if folder is None or not (folder / "open_clip_config.json").is_file():
            fix = (
                f"download it once with `huggingface-cli download {model[len(HF_HUB) :]}`"
                if model.startswith(HF_HUB)
                else "point it at a folder with open_clip_config.json and weights"
            )
            info.problem = f"open_clip model {model!r}: no open_clip_config.json in {info.where}; {fix}"
            return info
        weights = [name for name in OPEN_CLIP_WEIGHTS if (folder / name).is_file()]
        if not weights:
            info.problem = f"open_clip model {model!r}: no weights ({' or '.join(OPEN_CLIP_WEIGHTS)}) in {folder}"
            return info
        read_weights(folder, weights[:1], info)
        info.found = info.problem is None
        return info
    if not pretrained:  # an architecture without pretrained weights starts from random initialisation
        info.where, info.found = "random init (no pretrained tag)", True
        return info
    entry = open_clip_pretrained(model, pretrained)
    if entry is None:
        info.where = "open_clip's pretrained table"
        info.problem = (
            f"open_clip model {model!r} with pretrained {pretrained!r}: not in the installed open_clip's "
            f"pretrained table (or open_clip is not installed); see open_clip.list_pretrained()"
        )
        return info
    looked = []
    if entry.get("hf_hub"):
        repo = entry["hf_hub"].strip("/")
        snapshot = hub_snapshot(repo, cache)
        weights = [snapshot / n for n in OPEN_CLIP_WEIGHTS if snapshot and (snapshot / n).is_file()]
        if weights:
            info.where, info.found = str(weights[0].parent), True
            read_weights(weights[0].parent, [weights[0].name], info)
            return info
        looked.append(f"hf-hub {repo} in {cache}")
    if entry.get("url"):
        legacy = Path("~/.cache/clip").expanduser() / os.path.basename(entry["url"])
        if legacy.is_file():
            info.where, info.found, info.weight_bytes = str(legacy), True, legacy.stat().st_size
            return info
        looked.append(str(legacy))
    info.where = " or ".join(looked)
    fetch = f"`huggingface-cli download {entry['hf_hub'].strip('/')}`" if entry.get("hf_hub") else entry.get("url")
    info.problem = (
        f"open_clip model {model!r} with pretrained {pretrained!r} is not on this machine (looked in "
        f"{info.where}); download it once with {fetch}"
    )
    return info
