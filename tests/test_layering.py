"""The package's layering is a checked contract (pyproject.toml, [tool.importlinter]): `lint-imports` passes,
and it does fail on an import that points up, even one made inside a function."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    # lint-imports puts its working directory first on sys.path, so it reads the package found there.
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_layering_contracts_are_kept() -> None:
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_an_upward_function_local_import_breaks_the_contract(tmp_path: Path) -> None:
    shutil.copytree(REPO / "mllmfl_dist", tmp_path / "mllmfl_dist", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "mllmfl_dist" / "core" / "errors.py", "a") as module:
        module.write("\n\ndef _upward():\n    from mllmfl_dist.stages import report  # noqa: F401\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "mllmfl_dist.core.errors -> mllmfl_dist.stages.report" in done.stdout
