"""A strategy from a package of its own: the README's example (examples/fedavg_clip) installed as a real package,
found through its entry point, configured by its own checked section, resumed under that section's check,
and run under torchrun with 3 processes and by ``compare``."""

from __future__ import annotations

import csv
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.toml"
QUIET = ["log.progress=false", "log.tensorboard=false", "dist.threads=1"]


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """``pip install --target DIR examples/fedavg_clip`` (offline, no build isolation): a folder holding the
    module and its ``.dist-info`` (with the entry point), which a process sees on its PYTHONPATH."""
    target = tmp_path_factory.mktemp("plugin")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "--target",
            str(target),
            str(REPO / "examples" / "fedavg_clip"),
        ],
        check=True,
        timeout=600,
        cwd=target,
    )
    assert list(target.glob("mllmfl_fedavg_clip-*.dist-info/entry_points.txt"))
    return target


def run(plugin_path: Path, *argv: str, nproc: int = 0, sets=()) -> subprocess.CompletedProcess:
    """The CLI as a user starts it (``torchrun ... -m mllmfl_dist`` or ``python -m mllmfl_dist``), with the
    installed plugin on the path."""
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc
        else [sys.executable]
    )
    command = [*launcher, "-m", "mllmfl_dist", *argv, *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(plugin_path), str(REPO)])}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def errors(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("mllmfl_dist: error:")]


def test_an_installed_strategy_runs_on_three_processes_with_its_own_checked_section(plugin_path, tmp_path):
    sets = [
        f"run.root={tmp_path}",
        "run.name=clip",
        "federated.strategy=fedavg_clip",
        "fedavg_clip.max_norm=0.5",
        *QUIET,
    ]
    done = run(plugin_path, "federate", str(SMOKE), nproc=3, sets=[*sets, "federated.rounds=1"])
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "clip" / "federated"
    assert "[fedavg_clip]\nmax_norm = 0.5" in (tmp_path / "clip" / "config.toml").read_text()

    # The server step clipped the averaged update: the first round moved the trainable weights by max_norm.
    from mllmfl_dist.config import load_config
    from mllmfl_dist.stages.inputs import build_data, build_fl_model

    cfg = load_config(SMOKE, QUIET)  # the same data and initial model (FedAvg's family adds no projection)
    initial = build_fl_model(cfg.model, build_data(cfg), cfg.run.seed)
    after = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    moved = torch.cat(
        [(after[name].double() - p.detach().double()).flatten() for name, p in initial.named_parameters()]
    )
    assert float(moved.norm()) == pytest.approx(0.5, rel=1e-4)

    # Its section is part of the resume check: another max_norm is refused on every rank, named once.
    refused = run(
        plugin_path, "federate", str(SMOKE), nproc=3, sets=[*sets, "federated.rounds=2", "fedavg_clip.max_norm=0.25"]
    )
    assert refused.returncode != 0 and len(errors(refused)) == 1
    assert "fedavg_clip.max_norm: 0.5 -> 0.25" in errors(refused)[0]
    resumed = run(plugin_path, "federate", str(SMOKE), nproc=3, sets=[*sets, "federated.rounds=2"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["round"] == 2

    # ... and checked like ours: a bound, a type, an unknown key, each one line and exit code 2.
    for bad, words in (
        ("fedavg_clip.max_norm=-1", "fedavg_clip.max_norm = -1.0 is not allowed; it must be a number > 0"),
        ("fedavg_clip.max_norm=big", "fedavg_clip.max_norm must be a number"),
        ("fedavg_clip.nope=1", "unknown key fedavg_clip.nope"),
    ):
        done = run(plugin_path, "federate", str(SMOKE), sets=[*sets, bad])
        assert done.returncode == 2 and words in errors(done)[0], done.stderr[-2000:]


def test_compare_runs_an_installed_strategy_beside_the_built_in_ones(plugin_path, tmp_path):
    sets = [f"run.root={tmp_path}", "federated.rounds=1", *QUIET]
    done = run(plugin_path, "compare", str(SMOKE), "--methods", "fedavg,fedavg_clip", sets=sets)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "smoke" / "compare" / "results_per_seed.csv").open()))
    assert [(r["method"], r["strategy"], r["rounds"]) for r in rows] == [
        ("fedavg", "fedavg", "1"),
        ("fedavg_clip", "fedavg_clip", "1"),
    ]
    assert "| fedavg_clip | none (random init) |" in done.stdout

    # Without the package on the path the name is unknown, and the message lists the strategies there are
    # (unless the example is installed in this environment itself, as the README's `pip install` does).
    if "fedavg_clip" in {e.name for e in importlib.metadata.entry_points(group="mllmfl_dist.strategies")}:
        return
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "mllmfl_dist", "federate", str(SMOKE), "--set", "federated.strategy=fedavg_clip"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2 and "choose one of: fedavg, fedavgm, fedprox, creff, clip2fl" in done.stderr


def test_a_strategy_may_not_declare_a_built_in_section_with_another_dataclass():
    from dataclasses import dataclass

    from mllmfl_dist.config.strategy_sections import CreffConfig
    from mllmfl_dist.core.errors import ConfigError
    from mllmfl_dist.config.plugins import register_strategy, strategy_sections, unregister_strategy
    from mllmfl_dist.fl.strategies import FedAvg

    @dataclass(frozen=True)
    class OtherCreff:
        batch_size: int = 1

    class Clash(FedAvg):
        name = "clash_creff"
        sections = {"creff": OtherCreff}

    with pytest.raises(ConfigError, match=r"section \[creff\] with .*OtherCreff, but the built-in"):
        register_strategy(Clash)
    assert strategy_sections()["creff"] is CreffConfig

    class Shares(FedAvg):  # reading [creff] with its own dataclass is allowed
        name = "shares_creff"
        sections = {"creff": CreffConfig}

    try:
        assert register_strategy(Shares) is Shares and strategy_sections()["creff"] is CreffConfig
    finally:
        unregister_strategy("shares_creff")


def test_the_readme_plugin_with_per_client_state_keeps_each_clients_control_variate(tmp_path, monkeypatch):
    """examples/drift_control (the README's SCAFFOLD-like plugin), registered in this process: its clients' state
    reaches the store, returns to them in later rounds and moves the server's control variate."""
    import json

    from launchers import cli

    from mllmfl_dist.config.plugins import register_strategy, unregister_strategy

    monkeypatch.syspath_prepend(str(REPO / "examples" / "drift_control"))
    from drift_control import DriftControl

    register_strategy(DriftControl)
    try:
        sets = [
            f"run.root={tmp_path}",
            "federated.strategy=drift_control",
            "drift_control.control_lr=0.5",
            "federated.rounds=3",
            "federated.local_epochs=1",
            *QUIET,
        ]
        assert cli("federate", str(SMOKE), sets=sets) == 0
    finally:
        unregister_strategy("drift_control")
    out = tmp_path / "smoke" / "federated"
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    versions = dict(zip(saved["client_state"]["clients"].tolist(), saved["client_state"]["rounds"].tolist()))
    assert sorted(p.name for p in (out / "client_state").iterdir()) == sorted(
        f"{c}-{r}.pt" for c, r in versions.items()
    )
    assert set(versions.values()) <= {1, 2, 3} and 6 <= len(versions) <= 18
    norms = [json.loads(line)["control_norm"] for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert len(norms) == 3 and all(n > 0 for n in norms) and len(set(norms)) == 3
