"""The files a run reads, looked up without reading them: the models its stages load, the data files of
``data.source`` and every shard pattern. Each finder returns table rows and, for what is missing, one line
each (what, where it was looked for, how to get it); ``check`` prints both and ``run`` refuses on the lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mllmfl_dist.mllm.model_files import ModelFiles, find_hf_model, find_open_clip
from mllmfl_dist.core.preflight import IMAGENET_LT_LISTS

# data.* (numpy, torch) is imported inside the look-ups of the sources that need it: a config that reads none
# of them is checked without loading torch for them.


@dataclass
class Row:
    """One line of the check table: a group (model, data, shards, run dir, world, memory), the setting or
    name, ``ok`` / ``MISSING`` / ``unused`` / ``warn`` / ``info``, and the detail."""

    group: str
    name: str
    status: str
    detail: str


@dataclass
class Findings:
    rows: list[Row] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # one line per missing thing: refuses the run
    too_big: list[str] = field(default_factory=list)  # weights or disk over capacity: check refuses, run does not
    warnings: list[str] = field(default_factory=list)  # estimates over capacity: shown, exit unchanged
    models: dict[str, ModelFiles] = field(default_factory=dict)  # by role: annotate, pretrain, teacher, clip2fl

    def add(self, group: str, name: str, problem: str | None, detail: str, *, counts: bool = True) -> None:
        status = "ok" if problem is None else ("MISSING" if counts else "unused")
        self.rows.append(Row(group, name, status, detail if problem is None else problem))
        if problem is not None and counts:
            self.missing.append(problem)


def _size(info: ModelFiles) -> str:
    if not info.found:
        return ""
    params = f"{info.params / 1e9:.3g} B params" if info.params else "parameters unknown (.bin weights)"
    dtypes = "/".join(d.lower() for d in info.dtypes) or "dtype unknown"
    weight = f", {info.weight_bytes / 2**30:.2f} GiB" if info.weight_bytes else ""
    return f"{params}, {dtypes}{weight}; {info.where}"


def model_roles(cfg, stages: list[str], command: str) -> list[tuple[str, str, str, str, bool]]:
    """(role, settings, kind, name, used) of each model the config names; ``used``: the command loads it."""
    roles = []
    if cfg.annotate.model or "annotate" in stages:
        roles.append(("annotate", "annotate.model", "llava", cfg.annotate.model, "annotate" in stages))
    if cfg.pretrain.model or "pretrain" in stages:
        name = cfg.pretrain.model or cfg.annotate.model
        roles.append(
            (
                "pretrain",
                "pretrain.model" if cfg.pretrain.model else "pretrain.model (= annotate.model)",
                "llava",
                name,
                "pretrain" in stages,
            )
        )
    if cfg.align.teacher in ("llava", "clip"):
        kind = "llava" if cfg.align.teacher == "llava" else "open_clip"
        roles.append(
            (
                "teacher",
                f"align.teacher_model ({cfg.align.teacher})",
                kind,
                cfg.align.teacher_model,
                cfg.align.every > 0 and "federate" in stages,
            )
        )
    clip2fl = cfg.strategy_sections.get("clip2fl")
    if clip2fl is not None and clip2fl.model:
        used = cfg.federated.strategy == "clip2fl" and "federate" in stages or command == "compare"
        roles.append(("clip2fl", "clip2fl.model", "open_clip", clip2fl.model, used))
    return roles


def find_models(cfg, stages: list[str], command: str, out: Findings) -> None:
    """One row per distinct model (the settings that name it together), one missing line per missing one."""
    groups: dict[tuple[str, str, str], list[tuple[str, str, bool]]] = {}
    for role, setting, kind, name, used in model_roles(cfg, stages, command):
        if not name:
            out.add(
                "model",
                setting,
                f"{setting} is empty but the {role} stage needs a model" if used else "",
                "",
                counts=used,
            )
            continue
        pretrained = ""
        if kind == "open_clip":
            pretrained = cfg.align.clip_pretrained if role == "teacher" else cfg.strategy_sections["clip2fl"].pretrained
        groups.setdefault((kind, name, pretrained), []).append((role, setting, used))
    for (kind, name, pretrained), roles in groups.items():
        info = find_hf_model(name, kind) if kind == "llava" else find_open_clip(name, pretrained)
        out.models.update({role: info for role, _, _ in roles})
        used = any(u for _, _, u in roles)
        label = f"{', '.join(s for _, s, _ in roles)}: {name}" + (f" ({pretrained})" if pretrained else "")
        unused = "" if used else f"not loaded by {command}; "
        out.add(
            "model",
            label,
            info.problem if used or info.problem is None else unused + info.problem,
            unused + _size(info),
            counts=used,
        )


# ---------------------------------------------------------------------------------------------------- data


def _missing_files(folder: Path, names: list[str]) -> list[str]:
    return [name for name in names if not (folder / name).is_file()]


def find_data(cfg, out: Findings) -> None:
    data = cfg.data
    if data.source == "synthetic":
        out.add("data", "synthetic", None, "generated from run.seed; nothing to read")
    elif data.source in ("cifar10", "cifar100"):
        _find_cifar(data, out)
    elif data.source == "fashion_mnist":
        _find_fashion_mnist(data, out)
    elif data.source == "imagenet_lt":
        _find_imagenet_lt(data, out)
    elif data.source == "shards":
        for key in ("train_shards", "test_shards"):
            find_shards(f"data.{key}", getattr(data, key), out)


def _find_cifar(data, out: Findings) -> None:
    import torchvision.datasets as tv

    from mllmfl_dist.data.sources import CIFAR_DEFAULT_ROOT

    dataset = tv.CIFAR10 if data.source == "cifar10" else tv.CIFAR100
    title = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[data.source]
    folder = Path(data.root or CIFAR_DEFAULT_ROOT).expanduser() / dataset.base_folder
    names = [name for name, _ in dataset.train_list + dataset.test_list] + [dataset.meta["filename"]]
    missing = _missing_files(folder, names)
    if not missing:
        out.add("data", f"data.source {data.source}", None, f"{len(names)} files in {folder} (MD5s checked at load)")
        return
    if data.download:
        out.add(
            "data",
            f"data.source {data.source}",
            None,
            f"{len(missing)} of {len(names)} files not in {folder}: downloaded at start (data.download = true)",
        )
        return
    fix = (
        'get them once with `python -c "import torchvision; torchvision.datasets.'
        f"{dataset.__name__}('{folder.parent}', download=True)\"` or --set data.download=true, or set data.root"
    )
    if len(missing) == len(names):
        out.add(
            "data",
            f"data.source {data.source}",
            f"{title} files not found: no {', '.join(names)} in {folder}; {fix}",
            "",
        )
        return
    for name in missing:
        out.add("data", f"data.source {data.source}", f"{title} file {folder / name} not found; {fix}", "")


def _find_fashion_mnist(data, out: Findings) -> None:
    from mllmfl_dist.data.sources import FASHION_MNIST_DIRS, FASHION_MNIST_FILES

    folders = [Path(data.root).expanduser()] if data.root else [Path(d).expanduser() for d in FASHION_MNIST_DIRS]
    options = {
        f: [n for n in FASHION_MNIST_FILES if not ((f / n).is_file() or (f / f"{n}.gz").is_file())] for f in folders
    }
    best = min(folders, key=lambda f: len(options[f]))
    if not options[best]:
        out.add("data", "data.source fashion_mnist", None, f"4 idx files in {best}")
        return
    for name in options[best]:
        out.add(
            "data",
            "data.source fashion_mnist",
            f"Fashion-MNIST file {name}(.gz) not found in "
            f"{' or '.join(map(str, folders))}; `apt-get install dataset-fashion-mnist` or set data.root",
            "",
        )


def _find_imagenet_lt(data, out: Findings) -> None:
    root = Path(data.root).expanduser()
    lists = Path(data.lists_dir or data.root).expanduser()
    for list_name in IMAGENET_LT_LISTS:
        path = lists / list_name
        if not path.is_file():
            out.add(
                "data",
                f"imagenet_lt {list_name}",
                f'ImageNet-LT list {path} not found; put the OLTR lists in data.lists_dir ("" = data.root)',
                "",
            )
            continue
        entries = [line.rsplit(None, 1)[0] for line in path.read_text(errors="replace").splitlines() if line.strip()]
        absent = [entry for entry in entries if not (root / entry).is_file()]
        if absent:
            out.add(
                "data",
                f"imagenet_lt {list_name}",
                f"{len(absent)} of {len(entries)} images of {path} not "
                f"under data.root {root} (first: {absent[0]}); put ImageNet there (val/ sorted into synsets)",
                "",
            )
        else:
            out.add("data", f"imagenet_lt {list_name}", None, f"{len(entries)} images, all under {root}")


def find_shards(setting: str, pattern: str, out: Findings, *, needed: bool = True, note: str = "") -> list[Path]:
    """Count the shards of ``pattern`` (the loaders' own expansion); one missing line when none match."""
    from mllmfl_dist.data.base import DataError
    from mllmfl_dist.data.shards import expand_shards

    if not pattern:
        out.add("shards", setting, f"{setting} is empty but {note or 'the run reads it'}", "", counts=needed)
        return []
    try:
        found = expand_shards(pattern)
    except DataError as err:
        out.add("shards", f"{setting} {pattern}", f"{setting}: {err}", "", counts=needed)
        return []
    size = sum(p.stat().st_size for p in found)
    out.add(
        "shards",
        f"{setting} {pattern}",
        None,
        f"{len(found)} shard(s), {size / 2**20:.1f} MiB" + (f"; {note}" if note else ""),
    )
    return found


def find_stage_shards(cfg, stages: list[str], out: Findings) -> int:
    """The stages' shard patterns; returns the bytes of annotate's input shards (what annotation rewrites)."""
    written = 0
    if "annotate" in stages:
        written = sum(
            p.stat().st_size
            for p in find_shards("annotate.shards", cfg.annotate.shards, out, note="annotation captions them")
        )
    if "pretrain" in stages and cfg.pretrain.shards:
        find_shards("pretrain.shards", cfg.pretrain.shards, out, note="DWP trains on them")
    if cfg.align.every > 0 and "federate" in stages:
        if cfg.align.source == "pool":
            find_shards(
                "align.pool_shards",
                cfg.align.pool_shards,
                out,
                note=f"the alignment pool ({cfg.align.per_class} images per class)",
            )
        elif cfg.align.source == "web":
            find_shards("align.web_shards", cfg.align.web_shards, out, note="pseudo-labelled by the teacher")
        else:
            out.add(
                "shards",
                "align.source holdout",
                None,
                f"data.server_holdout_per_class = {cfg.data.server_holdout_per_class} images per class",
            )
    return written
