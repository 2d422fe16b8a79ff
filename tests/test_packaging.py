"""Packaging: every imported package is declared, and a wheel built from the repository runs the shipped
configs from a directory outside it (configs and shards as package data)."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def imported_top_level_packages() -> set[str]:
    """Top-level names of every third-party module that mllmfl_dist imports, at module level or inside a
    function."""
    names = set()
    for path in (REPO / "mllmfl_dist").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "mllmfl_dist"}


def test_every_imported_package_is_declared() -> None:
    project = _pyproject()["project"]
    declared = {_name(r) for r in project["dependencies"]}
    for extra, requirements in project["optional-dependencies"].items():
        if extra != "dev":
            declared |= {_name(r) for r in requirements}
    distributions = importlib.metadata.packages_distributions()
    imported = imported_top_level_packages()
    assert {"torch", "PIL", "braceexpand", "tokenizers", "safetensors", "wandb", "mlflow"} <= imported
    missing = {}
    for module in sorted(imported):
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        # mlflow is imported from the mlflow-skinny distribution (the full mlflow provides it too).
        if not dists & declared and not (module == "mlflow" and "mlflow-skinny" in declared):
            missing[module] = sorted(dists)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_tomli_only_below_python_311_and_py_typed_shipped() -> None:
    tomli = [r for r in _pyproject()["project"]["dependencies"] if _name(r) == "tomli"]
    assert tomli and all("python_version < '3.11'" in r for r in tomli)
    assert (REPO / "mllmfl_dist" / "py.typed").is_file()
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["mllmfl_dist"]


def _venv_on_top_of_this_one(where: Path) -> Path:
    """A fresh venv that sees this interpreter's site-packages (torch and the rest) without reinstalling them.

    ``venv --system-site-packages`` would expose the base interpreter's packages, not this venv's, so the
    new venv gets a .pth line with this venv's site-packages instead; a path added that way has its own .pth
    files ignored, so an editable install of mllmfl_dist there stays invisible and the wheel is what runs.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=300)
    python = where / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "outer_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_the_wheel_runs_shipped_configs_outside_the_repository(tmp_path) -> None:
    # Built from a copy of the tracked tree: setuptools writes build/ and *.egg-info into the source folder.
    source = tmp_path / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"
        ),
    )
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(dist),
            str(source),
        ],
        check=True,
        timeout=600,
        cwd=tmp_path,
    )
    (wheel,) = dist.glob("mllmfl_dist-*.whl")
    python = _venv_on_top_of_this_one(tmp_path / "venv")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet", str(wheel)],
        check=True,
        timeout=600,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK")}

    def cli(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(python), "-m", "mllmfl_dist", *argv],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    where = subprocess.run(
        [str(python), "-c", "import mllmfl_dist; print(mllmfl_dist.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(tmp_path / "venv")), f"not the wheel: {where}"

    quiet = ["--set", "log.progress=false", "--set", "log.tensorboard=false", "--set", "eval.every=1"]
    done = cli("federate", "configs/smoke.toml", "--set", "federated.rounds=2", *quiet)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "round 2: balanced acc" in done.stdout
    assert (elsewhere / "runs" / "smoke" / "federated" / "model_final.pt").is_file()

    # The offline default's client data are the shipped shards (package data): stage 2 alone on them.
    done = cli(
        "federate",
        "configs/default.toml",
        "--set",
        "federated.rounds=1",
        "--set",
        "model.pretrained_backbone=",
        "--set",
        "align.every=0",
        *quiet,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (elsewhere / "runs" / "default" / "federated" / "summary.json").is_file()
    assert not (elsewhere / "configs").exists() and not (elsewhere / "shards").exists()

    missing = cli("federate", "configs/nope.toml")
    assert missing.returncode == 2 and "configs/nope.toml" in missing.stderr


@pytest.mark.parametrize("path", ["configs/smoke.toml", "shards/README.md"])
def test_shipped_paths_resolve_from_another_directory(tmp_path, monkeypatch, path) -> None:
    from mllmfl_dist.core.resources import resolve_path, shipped_pattern

    monkeypatch.chdir(tmp_path)
    assert resolve_path(path) == REPO / path
    assert shipped_pattern("shards/fmnist_lt/train-*.tar.gz") == f"{REPO / 'shards'}/fmnist_lt/train-*.tar.gz"
    (tmp_path / "shards").mkdir()  # a shards/ folder of the user's own takes precedence
    assert shipped_pattern("shards/x-*.tar") == "shards/x-*.tar"
    assert resolve_path("configs/absent.toml") == Path("configs/absent.toml")
