"""The package type-checks: ``python -m mypy mllmfl_dist`` with the configuration in pyproject.toml
(``[tool.mypy]``: a baseline over the package, strict on core/, config/ and fl/).

The first run in a checkout parses torch's annotations and takes minutes; later runs reuse .mypy_cache
(git-ignored) and take seconds."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_mypy(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mypy", *args], cwd=cwd, capture_output=True, text=True, timeout=1200)


def test_the_package_type_checks() -> None:
    done = run_mypy("mllmfl_dist", cwd=REPO)
    assert done.returncode == 0, f"mypy found errors:\n{done.stdout}{done.stderr}"
    assert "Success: no issues found" in done.stdout


def test_strict_applies_to_core_config_and_fl_only(tmp_path: Path) -> None:
    # mypy reads `strict = true` in an override as the global --strict, so the config spells the flags out
    # per module; an unannotated function must fail under core/, config/ and fl/ and pass under stages/.
    for package in ("", "core", "config", "fl", "stages"):
        folder = tmp_path / "mllmfl_dist" / package
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__init__.py").write_text("")
        if package:
            (folder / "untyped.py").write_text("def twice(x):\n    return 2 * x\n")
    done = run_mypy(
        "--config-file",
        str(REPO / "pyproject.toml"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "mllmfl_dist",
        cwd=tmp_path,
    )
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    for package in ("core", "config", "fl"):
        assert f"mllmfl_dist/{package}/untyped.py:1: error: Function is missing a type annotation" in out, out
    assert "mllmfl_dist/stages/" not in out, out
