"""Start-up of the CLI: ``--help`` must not import torch (seconds), and the error classes the CLI catches
are the ones the heavy modules raise."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "numpy", "deepspeed", "transformers", "open_clip", "tensorboard", "wandb", "mlflow")


def imported_modules(*argv: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime -m mllmfl_dist ARGV`` in the repository; the modules it imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mllmfl_dist", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    modules = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            modules.add(line.rsplit("|", 1)[1].strip())
    assert modules, f"no -X importtime output: {done.stderr[-500:]}"
    return done, modules


@pytest.mark.parametrize("argv", [("--help",), ("federate", "--help"), ("shards", "--help"), ("probe", "--help")])
def test_help_imports_no_heavy_package(argv) -> None:
    done, modules = imported_modules(*argv)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
    loaded = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert not loaded, f"--help imported {loaded[:10]}"
    assert "mllmfl_dist.config" in modules  # the check sees our own imports


def test_the_help_names_every_built_in_strategy() -> None:
    from mllmfl_dist.commands.cli import build_parser
    from mllmfl_dist.config.plugins import builtin_strategy_names

    text = " ".join(build_parser().format_help().split())  # the list wraps across lines
    assert all(f" {name}," in text or f" {name} or a plug-in" in text for name in builtin_strategy_names()), text


def test_a_usage_error_exits_2_without_torch() -> None:
    done, modules = imported_modules("federate")  # CONFIG missing
    assert done.returncode == 2 and "CONFIG" in done.stderr.upper()
    assert "torch" not in modules


@pytest.mark.parametrize(
    "override, words",
    [
        ("federated.lr=abc", "federated.lr must be a number"),
        ("creff.lr_crt=-1", "creff.lr_crt = -1.0 is not allowed"),
        ("clip2fl.nope=1", "unknown key clip2fl.nope"),
    ],
)
def test_a_config_value_error_exits_2_without_torch(override, words) -> None:
    """A typo in a value or key of the run's or a built-in strategy's section is one line before torch loads
    (the built-in strategies' sections are declared torch-free, config/strategy_sections.py)."""
    done, modules = imported_modules("federate", "configs/smoke.toml", "--set", override)
    assert done.returncode == 2 and words in done.stderr, done.stderr[-2000:]
    assert "torch" not in modules


def test_the_cli_catches_the_classes_the_modules_raise() -> None:
    from mllmfl_dist import config, data
    from mllmfl_dist.core import dist, errors
    from mllmfl_dist.fl import trainer
    from mllmfl_dist.mllm import llava as mllm

    assert config.ConfigError is errors.ConfigError
    assert data.DataError is errors.DataError
    assert mllm.ModelLoadError is errors.ModelLoadError
    assert dist.RankLostError is errors.RankLostError
    assert trainer.TrainingDivergedError is errors.TrainingDivergedError
    from mllmfl_dist.data.images import CorruptImageError
    from mllmfl_dist.data.shards import ShardError

    assert issubclass(ShardError, errors.DataError) and issubclass(CorruptImageError, errors.DataError)
