"""SIGUSR1 to one rank stops every rank after the same round, with a checkpoint of that round (torchrun, no
Slurm needed; tests/test_slurm.py runs the whole requeue on a real Slurm)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from launchers import REPO, SMOKE, clean_env, sets


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def local_rank(pid: int) -> int | None:
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if item.startswith(b"LOCAL_RANK="):
            return int(item.split(b"=", 1)[1])
    return None


def test_usr1_to_one_client_host_stops_all_ranks_after_one_round_with_a_checkpoint(tmp_path):
    out = tmp_path / "smoke" / "federated"
    # checkpoint.every far beyond the run: the checkpoint at the stop is the stop's own.
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=3",
            "-m",
            "mllmfl_dist",
            "federate",
            str(SMOKE),
            *sets(f"run.root={tmp_path}", "checkpoint.every=100", "log.progress=false"),
        ],
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / "rounds.jsonl").exists() or len((out / "rounds.jsonl").read_text().splitlines()) < 2:
            assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()[1][-3000:]
            time.sleep(0.1)
        host = next(pid for pid in children(agent.pid) if local_rank(pid) == 2)  # rank 2: not the server
        os.kill(host, signal.SIGUSR1)
        _, stderr = agent.communicate(timeout=300)
    finally:
        agent.kill()

    assert agent.returncode != 0  # torchrun reports its workers' exit code 75 as a failure
    assert "exitcode  : 75" in stderr
    line = next(line for line in stderr.splitlines() if line.startswith("mllmfl_dist: preempted"))
    stopped = int(line.split("stopped after round ")[1].split()[0])
    assert 2 <= stopped < 10 and "on SIGUSR1 (received by 1 of 3 ranks)" in line, line
    assert f"rerun the same command to resume from round {stopped + 1}" in line
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["round"] == stopped
    assert [json.loads(r)["round"] for r in (out / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, stopped + 1)
    )
    assert not (out / "model_final.pt").exists()  # a stopped run is not a finished one
