"""SCAFFOLD's per-client state across world sizes and a real SIGKILL: 1 and 3 processes end with the same model
(to float reduction noise) and the same store, and a run killed after a round that wrote no checkpoint (but wrote
newer client state) resumes to exactly the model of a straight run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launchers import REPO, SMOKE, clean_env, max_abs_difference, sets

# Local momentum so SCAFFOLD's correction goes through it; every client state entry spills to disk at once.
COMMON = [
    "dist.threads=1",
    "log.progress=false",
    "log.tensorboard=false",
    "federated.momentum=0.5",
    "federated.num_clients=12",
    "federated.clients_per_round=5",
    "federated.local_epochs=1",
    "federated.rounds=5",
    "checkpoint.every=2",
    "federated.client_state_mb=0",
]

# A SCAFFOLD that SIGKILLs its own process on rank 0 inside round KILL_AT_ROUND's server step: after the round's
# client states reached the store (and, with a budget of 0, its files), before that round's checkpoint.
DRIVER = """
import os, signal, sys
from mllmfl_dist.config.plugins import register_strategy
from mllmfl_dist.fl.strategies.scaffold import Scaffold

class KilledScaffold(Scaffold):
    name = "scaffold_killed"

    def process_uploads(self, model, sums, round_index):
        if round_index == int(os.environ.get("KILL_AT_ROUND", "0")):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().process_uploads(model, sums, round_index)

register_strategy(KilledScaffold)
from mllmfl_dist.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def federate(driver: Path, nproc: int, root: Path, name: str, **env: str) -> subprocess.CompletedProcess:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    command = [
        *launcher,
        str(driver),
        "federate",
        str(SMOKE),
        *sets(f"run.root={root}", f"run.name={name}", "federated.strategy=scaffold_killed", *COMMON),
    ]
    return subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=900, env=clean_env(PYTHONPATH=str(REPO), **env)
    )


def final(root: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(root / name / "federated" / "model_final.pt", weights_only=True)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, Path]:
    """The driver and one uninterrupted single-process run."""
    root = tmp_path_factory.mktemp("scaffold")
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    done = federate(driver, 1, root, "straight")
    assert done.returncode == 0, done.stderr[-3000:]
    return driver, root


def index(root: Path, name: str) -> dict[int, int]:
    saved = torch.load(root / name / "federated" / "checkpoint.pt", weights_only=True)["client_state"]
    return dict(zip(saved["clients"].tolist(), saved["rounds"].tolist()))


def test_scaffold_on_one_and_three_processes_ends_with_the_same_model(straight, tmp_path):
    driver, root = straight
    done = federate(driver, 3, tmp_path, "three")
    assert done.returncode == 0, done.stderr[-3000:]
    # The float64 sums of the control deltas cancel heavily, so another summation order (1 host or 2) can round
    # c to another float32 from round 2 on (measured: 1.2e-7 after round 2, 6.7e-5 after round 5); FedAvg's
    # models of the same runs are equal bit for bit.
    assert max_abs_difference(final(root, "straight"), final(tmp_path, "three")) <= 1e-3
    # The same clients hold the same versions, one committed file each.
    assert index(root, "straight") == index(tmp_path, "three")
    store = tmp_path / "three" / "federated" / "client_state"
    assert sorted(p.name for p in store.iterdir()) == sorted(f"{c}-{r}.pt" for c, r in index(root, "straight").items())
    assert 5 <= len(index(root, "straight")) <= 12


def test_a_run_killed_after_a_round_without_checkpoint_resumes_reading_client_state_as_of_its_checkpoint(
    straight, tmp_path
):
    driver, root = straight
    killed = federate(driver, 1, tmp_path, "killed", KILL_AT_ROUND="4")
    assert killed.returncode != 0
    out = tmp_path / "killed" / "federated"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["round"] == 2  # round 3 wrote no checkpoint
    rounds = {int(re.fullmatch(r"\d+-(\d+)\.pt", p.name)[1]) for p in (out / "client_state").iterdir()}
    assert {3, 4} <= rounds  # newer entries than the checkpoint's are on disk

    resumed = federate(driver, 1, tmp_path, "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    a, b = final(root, "straight"), final(tmp_path, "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)  # had it read a newer c_i, its model would differ
    assert index(root, "straight") == index(tmp_path, "killed")
    assert not [p for p in os.listdir(out / "client_state") if p.startswith(".")]
