"""Faults with real processes and real signals under torchrun: a stopped rank mid-round and after the last
round, a killed rank with elastic restarts, a user error printed once, training that goes non-finite."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mllmfl_dist.__main__ import main

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.toml"
QUIET = ["log.progress=false", "log.tensorboard=false", "dist.threads=1"]


def torchrun(root: Path, sets: list[str], *, restarts: int = 0) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=3",
        f"--max-restarts={restarts}",
        "-m",
        "mllmfl_dist",
        "federate",
        str(SMOKE),
        *[a for s in [f"run.root={root}", *QUIET, *sets] for a in ("--set", s)],
    ]
    return subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def worker_pid(root: Path, local_rank: int) -> int:
    """The pid of the worker with ``local_rank`` of the job writing under ``root`` (read from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            f"run.root={root}" in cmdline
            and "torch.distributed.run" not in cmdline
            and f"LOCAL_RANK={local_rank}".encode() in environ
        ):
            return int(entry.name)
    raise AssertionError(f"no worker with LOCAL_RANK={local_rank} under {root}")


def wait_for_rounds(root: Path, rounds: int, process: subprocess.Popen, limit: float = 240) -> None:
    path = root / "smoke" / "federated" / "rounds.jsonl"
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= rounds:
            return
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"round {rounds} never finished")


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("mllmfl_dist: error:")]


def test_a_client_stopped_mid_round_ends_every_rank_naming_it_and_the_timeout_key(tmp_path):
    process = torchrun(tmp_path, ["federated.rounds=100", "dist.timeout_minutes=0.15", "dist.wait_report_seconds=2"])
    wait_for_rounds(tmp_path, 1, process)
    stopped = worker_pid(tmp_path, 2)
    os.kill(stopped, signal.SIGSTOP)
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        os.kill(stopped, signal.SIGKILL) if Path(f"/proc/{stopped}").exists() else None
    assert process.returncode != 0
    # Announced while waiting, then one line per waiting rank that names the missing rank and the key. The stop
    # may land before rank 2 reached the all_reduce (not there yet) or inside it (arrived, then silent).
    assert re.search(
        r"rank\(s\) 2 (not there yet|arrived but silent for 3 s or more) "
        r"\(gives up after dist\.timeout_minutes = 0\.15 min\)",
        stderr,
    ), stderr[-3000:]
    # Ranks 0 and 1 time out together; torchrun may end one of them before it prints, when the other exits.
    lines = errors(stderr)
    assert lines and {line.split(":")[2].strip() for line in lines} <= {"rank 0", "rank 1"}, stderr[-3000:]
    assert all(
        re.search(r"rank\(s\) 2 (never arrived|arrived but went silent)", line)
        and "dist.timeout_minutes = 0.15" in line
        for line in lines
    ), lines
    assert "all_reduce" in lines[0]
    # torchrun's failure block carries the message (torchelastic's error file), not a traceback.
    assert "traceback : mllmfl_dist: error: rank" in stderr


def test_a_client_stopped_after_the_last_round_cannot_cost_the_final_model(tmp_path):
    # A large test set keeps rank 0 evaluating after the last round while rank 2 already waits for it, so
    # the stop lands in that window (if rank 2 still got through, the job ends normally: checked below).
    process = torchrun(tmp_path, ["federated.rounds=2", "dist.timeout_minutes=0.15", "data.test_per_class=3000"])
    wait_for_rounds(tmp_path, 2, process)
    stopped = worker_pid(tmp_path, 2)
    os.kill(stopped, signal.SIGSTOP)
    started = time.monotonic()
    try:
        _, stderr = process.communicate(timeout=150)
    except subprocess.TimeoutExpired:  # everyone else finished; torchrun waits for the stopped process
        os.kill(stopped, signal.SIGCONT)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr[-2000:]
    finally:
        os.kill(stopped, signal.SIGKILL) if Path(f"/proc/{stopped}").exists() else None
    assert time.monotonic() - started < 200  # bounded by dist.timeout_minutes, not the 24-hour control timeout
    out = tmp_path / "smoke" / "federated"
    final = torch.load(out / "model_final.pt", weights_only=True)
    assert torch.equal(
        final["classifier.weight"], torch.load(out / "checkpoint.pt", weights_only=True)["model"]["classifier.weight"]
    )
    if process.returncode != 0:  # the stop came before rank 2 reached the end
        missing = [
            re.search(r"rank\(s\) ([\d, ]+) (never arrived|arrived but went silent)", line) for line in errors(stderr)
        ]
        assert any(m and "2" in m.group(1).split(", ") for m in missing), stderr[-2000:]
        assert all("dist.timeout_minutes" in line for line in errors(stderr))


def test_an_elastic_restart_after_a_killed_rank_resumes_and_equals_a_straight_run(tmp_path):
    straight = torchrun(tmp_path / "straight", ["federated.rounds=5"])
    assert straight.wait(timeout=300) == 0, straight.communicate()[1][-3000:]
    process = torchrun(tmp_path / "killed", ["federated.rounds=5"], restarts=1)
    wait_for_rounds(tmp_path / "killed", 3, process)
    os.kill(worker_pid(tmp_path / "killed", 1), signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "resuming" in stderr and "from round" in stderr
    a = torch.load(tmp_path / "straight" / "smoke" / "federated" / "model_final.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "smoke" / "federated" / "model_final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rounds_log = tmp_path / "killed" / "smoke" / "federated" / "rounds.jsonl"
    rounds = [json.loads(line)["round"] for line in rounds_log.open()]
    assert rounds == [1, 2, 3, 4, 5]  # redone rounds replace their records


def test_a_config_error_under_torchrun_is_printed_once_first_and_carried_by_the_failure_block(tmp_path):
    process = torchrun(tmp_path, ["federated.lr=inf"])
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1  # torchrun's own code when a worker fails; the worker exited 2
    assert errors(stderr) == ["mllmfl_dist: error: federated.lr must be a finite number, got inf"]
    first = next(i for i, line in enumerate(stderr.splitlines()) if "mllmfl_dist" in line or "Traceback" in line)
    assert stderr.splitlines()[first].startswith("mllmfl_dist: error:")
    assert "exitcode  : 2" in stderr and "traceback : mllmfl_dist: error: federated.lr must be a finite" in stderr


@pytest.mark.parametrize(
    ("sets", "names"),
    [
        (["federated.lr=1e6"], ["the local training of client(s)", "federated.lr = 1e+06"]),
        # server_lr at float32's edge (a larger one is refused at load): local steps at lr 1 move weights by more than
        # 1, so the float64 server step leaves float32's range when cast back
        (
            ["federated.strategy=fedavgm", "federated.server_lr=3e38", "federated.lr=1"],
            ["the server step", "federated.server_lr"],
        ),
        (
            [
                "align.every=1",
                "align.source=holdout",
                "data.server_holdout_per_class=5",
                "align.per_class=5",
                "align.lr=1e38",
                "align.steps=30",
            ],
            ["global alignment", "align.lr = 1e+38"],
        ),
    ],
)
def test_training_that_goes_non_finite_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, sets, names):
    common = [f"run.root={tmp_path}", *QUIET, "federated.rounds=4"]
    assert main(["federate", str(SMOKE), *[a for s in [*common, *sets] for a in ("--set", s)]]) == 3
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("mllmfl_dist: error: training diverged: round ") and all(n in message for n in names)
    out = tmp_path / "smoke" / "federated"
    assert not (out / "model_final.pt").exists()
    diverged_round = int(message.split("round ")[1].split(":")[0])
    if diverged_round > 1:  # the last good round's checkpoint is there, finite
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        assert state["round"] == diverged_round - 1
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
