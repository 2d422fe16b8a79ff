"""The Slurm launch scripts on a real Slurm (launch/local_slurm.sh: two slurmd on this host, nodes 127.0.0.1
and 127.0.0.2): sbatch from the repository, both launch styles, a preempted job that requeues itself and
resumes, and what a job refuses. Skipped where the local Slurm cannot start (not root, no packages)."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from launchers import REPO, final_model, max_abs_difference

# The README's worked example: 3 tasks on one node, one CPU (so dist.threads = 1) and no GPU each.
SRUN_STYLE = ["--nodes=1", "--ntasks-per-node=3", "--cpus-per-task=1", "--gpus-per-node=0"]
# One torchrun per node with two ranks each: 4 ranks on 2 nodes; 2 CPUs per node task -> dist.threads = 1.
TORCHRUN_STYLE = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2", "--gpus-per-node=0"]
ROUNDS4 = "federated.rounds=4"
ONE_TASK = ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0"]


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def rounds_done(root: Path) -> int:
    return len(read(root / "smoke" / "federated" / "rounds.jsonl").splitlines())


def test_local_slurm_runs_tasks_on_two_nodes(local_slurm):
    assert len(local_slurm.nodes) == 2, f"one node only: {local_slurm.nodes}"
    result = local_slurm.run(
        [
            "srun",
            "--nodes=2",
            "--ntasks=3",
            "--ntasks-per-node=2",
            "bash",
            "-c",
            "echo $SLURM_PROCID $SLURMD_NODENAME $SLURM_LOCALID",
        ]
    )
    assert result.returncode == 0, result.stderr
    placed = sorted(line.split() for line in result.stdout.splitlines())
    assert placed == [["0", "127.0.0.1", "0"], ["1", "127.0.0.1", "1"], ["2", "127.0.0.2", "0"]]


def test_sbatch_runs_federate_to_the_end_like_torchrun(local_slurm, smoke_reference, tmp_path):
    log = tmp_path / "job.out"
    job = local_slurm.sbatch(
        [f"--output={log}", *SRUN_STYLE],
        "launch/slurm.sbatch",
        ["configs/smoke.toml", "--set", f"run.root={tmp_path}"],
        MLLMFL_COMMAND="federate",
    )
    state = local_slurm.wait(job)
    print(local_slurm.sacct_table(job))
    assert state == "COMPLETED", read(log)[-3000:]
    assert [r["State"] for r in local_slurm.sacct(job)] == ["COMPLETED"]
    assert f"rank 0 at 127.0.0.1:{15000 + job % 15000}" in read(log)  # MASTER_ADDR/PORT as documented
    summary = json.loads((tmp_path / "smoke" / "federated" / "summary.json").read_text())
    assert summary["world_size"] == 3 and summary["final"]["round"] == 10
    assert "threads = 1" in (tmp_path / "smoke" / "config.toml").read_text()
    assert max_abs_difference(final_model(tmp_path), smoke_reference(3)) <= 1e-6


def test_sbatch_gives_each_rank_its_cpus_as_threads(local_slurm, tmp_path):
    log = tmp_path / "job.out"
    job = local_slurm.sbatch(
        [f"--output={log}", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=3", "--gpus-per-node=0"],
        "launch/slurm.sbatch",
        [
            "configs/smoke.toml",
            *[
                a
                for s in (
                    f"run.root={tmp_path}",
                    "federated.rounds=1",
                    "federated.num_clients=2",
                    "federated.clients_per_round=1",
                )
                for a in ("--set", s)
            ],
        ],
        MLLMFL_COMMAND="federate",
    )
    assert local_slurm.wait(job) == "COMPLETED", read(log)[-3000:]
    assert "threads = 3" in (tmp_path / "smoke" / "config.toml").read_text()


def test_sbatch_torchrun_style_two_nodes_equals_one_node(local_slurm, smoke_reference, tmp_path):
    log = tmp_path / "job.out"
    job = local_slurm.sbatch(
        [f"--output={log}", *TORCHRUN_STYLE],
        "launch/slurm_torchrun.sbatch",
        ["configs/smoke.toml", "--set", f"run.root={tmp_path}", "--set", ROUNDS4],
        MLLMFL_COMMAND="federate",
        MLLMFL_NPROC_PER_NODE="2",
    )
    assert local_slurm.wait(job) == "COMPLETED", read(log)[-3000:]
    assert "on 127.0.0.[1-2]" in read(log)
    summary = json.loads((tmp_path / "smoke" / "federated" / "summary.json").read_text())
    assert summary["world_size"] == 4
    assert max_abs_difference(final_model(tmp_path), smoke_reference(4, ROUNDS4)) <= 1e-6


def test_usr1_stops_at_a_round_requeues_and_resumes_to_the_same_model(local_slurm, smoke_reference, tmp_path):
    log = tmp_path / "job.out"
    job = local_slurm.sbatch(
        [f"--output={log}", *SRUN_STYLE],
        "launch/slurm.sbatch",
        ["configs/smoke.toml", "--set", f"run.root={tmp_path}"],
        MLLMFL_COMMAND="federate",
    )
    deadline = time.monotonic() + 300
    while rounds_done(tmp_path) < 2:  # training has started: every rank holds its handler
        assert time.monotonic() < deadline and local_slurm.state(job) in ("PENDING", "RUNNING"), read(log)
        time.sleep(0.2)
    # What Slurm does before the time limit with --signal=B:USR1@...: signal the batch shell.
    signal = local_slurm.run(["scancel", "--batch", "--signal=USR1", str(job)])
    assert signal.returncode == 0, signal.stderr
    state = local_slurm.wait(job)
    text = read(log)
    print(local_slurm.sacct_table(job))
    assert state == "COMPLETED", text[-3000:]

    stopped = int(text.split("preempted: stopped after round ")[1].split()[0])
    assert 2 <= stopped < 10, text
    # Every rank of the step gets the signal, but not necessarily before the same round's all_reduce.
    assert re.search(r"on SIGUSR1 \(received by [1-3] of 3 ranks\); checkpoint", text), text[-3000:]
    exits = [line for line in text.splitlines() if "Exited with exit code" in line or ": Terminated" in line]
    assert exits and all(line.endswith("exit code 75") for line in exits), exits  # none killed by another
    assert f"the ranks stopped on USR1 (exit 75); requeueing job {job}" in text and "(restart 1)" in text
    assert f"resuming {tmp_path / 'smoke' / 'federated'} from round {stopped}" in text
    runs = local_slurm.sacct(job)  # the stopped run (requeued: not COMPLETED), then the resumed one
    assert len(runs) == 2 and runs[0]["State"] != "COMPLETED" and runs[1]["State"] == "COMPLETED", runs
    lines = read(tmp_path / "smoke" / "federated" / "rounds.jsonl").splitlines()
    assert [json.loads(line)["round"] for line in lines] == list(range(1, 11))  # no round lost or repeated
    assert max_abs_difference(final_model(tmp_path), smoke_reference(3)) <= 1e-6


def test_srun_alone_finds_rank_0_from_the_node_list(local_slurm, tmp_path):
    """srun without the scripts and without MASTER_ADDR / MASTER_PORT: dist.py expands the step's node list
    with scontrol and derives the port from the job id."""
    result = local_slurm.run(
        [
            "srun",
            "--nodes=2",
            "--ntasks=3",
            "--ntasks-per-node=2",
            sys.executable,
            "-m",
            "mllmfl_dist",
            "federate",
            "configs/smoke.toml",
            "--set",
            f"run.root={tmp_path}",
            "--set",
            "federated.rounds=1",
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "smoke" / "federated" / "summary.json").read_text())["world_size"] == 3


def test_a_batch_script_body_refuses_in_one_line(local_slurm, tmp_path):
    """python -m mllmfl_dist in an sbatch body with 3 tasks (no srun) would wait for ranks that never come."""
    log = tmp_path / "job.out"
    job = local_slurm.sbatch(
        [f"--output={log}", "--ntasks=3", "--ntasks-per-node=3"],
        "--wrap",
        [f"{sys.executable} -m mllmfl_dist federate configs/smoke.toml"],
    )
    assert local_slurm.wait(job, timeout=120) == "FAILED"
    lines = [line for line in read(log).splitlines() if line.strip()]
    assert len(lines) == 1 and "SLURM_NTASKS=3 but this process was not started by srun" in lines[0], lines
    assert local_slurm.sacct(job)[0]["ExitCode"] == "2:0"


def test_a_job_without_venv_ends_in_one_line(local_slurm, tmp_path):
    log = tmp_path / "job.out"
    job = local_slurm.sbatch(
        [f"--output={log}", *ONE_TASK],
        "launch/slurm.sbatch",
        ["configs/smoke.toml"],
        MLLMFL_VENV=str(tmp_path / "no-venv"),
    )
    assert local_slurm.wait(job, timeout=120) == "FAILED"
    lines = read(log).splitlines()
    assert len(lines) == 1 and "no virtual environment at" in lines[0] and "launch/venv.sh" in lines[0], lines


def test_submitting_from_outside_the_repository_ends_in_one_line(local_slurm, tmp_path):
    log = tmp_path / "job.out"
    result = local_slurm.run(
        [
            "sbatch",
            "--parsable",
            f"--output={log}",
            *ONE_TASK,
            str(REPO / "launch" / "slurm.sbatch"),
            "configs/smoke.toml",
        ],
        cwd=tmp_path,
    )
    job = int(result.stdout.strip())
    assert local_slurm.wait(job, timeout=120) == "FAILED"
    lines = read(log).splitlines()
    assert len(lines) == 1 and "is not the repository root" in lines[0], lines


@pytest.mark.parametrize("script", ["launch/slurm.sbatch", "launch/slurm_torchrun.sbatch"])
def test_scripts_ask_for_a_warning_signal_and_requeue(script):
    header = (REPO / script).read_text()
    # The preemption test sends USR1 by hand; these directives make Slurm send it before the time limit.
    assert "#SBATCH --signal=B:USR1@" in header and "#SBATCH --requeue" in header


def test_a_job_missing_a_model_fails_before_any_rank_starts(local_slurm, tmp_path):
    """The sbatch scripts run `check` for the job's world first: one line per missing thing, exit 2."""
    log = tmp_path / "job.out"
    job = local_slurm.sbatch(
        [f"--output={log}", *SRUN_STYLE],
        "launch/slurm.sbatch",
        ["configs/tiny_mllm.toml", "--set", f"run.root={tmp_path}", "--set", f"annotate.model={tmp_path}/no-llava"],
    )
    assert local_slurm.wait(job, timeout=180) == "FAILED"
    text = read(log)
    assert f"missing: model '{tmp_path}/no-llava': no directory" in text, text[-3000:]
    assert "3 rank(s) on 1 node(s), 3 per node" in text  # the job's world, not this process's
    assert not (tmp_path / "tiny_mllm").exists()  # no rank started, nothing written
