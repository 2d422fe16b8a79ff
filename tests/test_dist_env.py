"""How a process finds its place in the job: torchrun's variables, an srun step's, or neither."""

import json
import subprocess
import sys
import time

import pytest

from launchers import REPO, clean_env
from mllmfl_dist.config import ConfigError, DistConfig
from mllmfl_dist.core.dist import init_runtime
from mllmfl_dist.core.launch import first_to_report, read_launch_env, slurm_hostnames, slurm_port, slurm_rendezvous

# What srun puts in a task's environment (the names that matter here), for a step of 8 tasks.
STEP = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "8",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_STEP_NODELIST": "gpu[003-004]",
    "SLURM_JOB_NODELIST": "gpu[003-004]",
}
# And what an sbatch script body sees with --ntasks=4 (no step: SLURM_STEP_ID is missing).
BATCH_BODY = {
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "0",
    "SLURM_NTASKS": "4",
    "SLURM_LOCALID": "0",
    "SLURM_JOB_NODELIST": "gpu[003-004]",
}


def test_torchrun_environment_wins():
    env = {"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "0", **STEP}
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (2, 3, 0, "torchrun")


def test_an_srun_step_of_several_tasks_is_a_slurm_launch():
    launch = read_launch_env(STEP)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (5, 8, 1, "slurm")


def test_a_step_of_one_task_or_no_slurm_at_all_is_one_process():
    one = {**STEP, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}
    assert read_launch_env(one).launcher == "none"
    # A one-task step inside a bigger allocation (srun -n1 in an sbatch --ntasks=4 job): the step decides.
    assert read_launch_env({**one, "SLURM_NTASKS": "4"}).launcher == "none"
    assert read_launch_env({}).world_size == 1
    assert read_launch_env({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}).launcher == "none"


def test_slurm_variables_outside_a_step_are_refused():
    with pytest.raises(ConfigError, match="SLURM_NTASKS=4 but this process was not started by srun"):
        read_launch_env(BATCH_BODY)
    with pytest.raises(ConfigError, match="not started by srun"):  # an salloc shell: no SLURM_PROCID either
        read_launch_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"})


def test_a_batch_script_body_ends_at_once_in_one_line(tmp_path):
    """The process no longer waits 30 minutes for ranks that never come and dies with a DistStoreError."""
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mllmfl_dist",
            "federate",
            str(REPO / "configs" / "smoke.toml"),
            "--set",
            f"run.root={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(**BATCH_BODY),
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mllmfl_dist: error: SLURM_NTASKS=4"), result.stderr
    assert "srun" in lines[0] and time.monotonic() - started < 60
    assert not (tmp_path / "smoke").exists()


def test_a_step_of_one_task_trains_alone(tmp_path):
    one = {**STEP, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mllmfl_dist",
            "federate",
            str(REPO / "configs" / "smoke.toml"),
            "--set",
            f"run.root={tmp_path}",
            "--set",
            "federated.rounds=1",
            "--set",
            "log.progress=false",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(**one),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "smoke" / "federated" / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["backend"] == "none"


def test_rendezvous_variables_win_and_the_port_follows_the_job():
    assert slurm_rendezvous({**STEP, "MASTER_ADDR": "head", "MASTER_PORT": "1234"}) == ("head", "1234")
    assert slurm_rendezvous({**STEP, "MASTER_ADDR": "head"}) == ("head", str(slurm_port(4242)))
    assert slurm_port(4242) == 15000 + 4242 and slurm_port(15000 + 4242) == slurm_port(4242)
    assert all(15000 <= slurm_port(j) < 30000 for j in (0, 1, 14999, 15000, 10**9))  # below the ephemeral ports


def test_node_lists_are_expanded_by_slurm(local_slurm, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(local_slurm.conf))
    assert slurm_hostnames("rack[1-2]-node[01-02],gpu7") == [
        "rack1-node01",
        "rack1-node02",
        "rack2-node01",
        "rack2-node02",
        "gpu7",
    ]
    assert slurm_rendezvous({**STEP, "SLURM_STEP_NODELIST": "rack[1-2]-node[01-04]"})[0] == "rack1-node01"


def test_a_node_list_without_scontrol_names_master_addr(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol there
    with pytest.raises(ConfigError, match="set MASTER_ADDR"):
        slurm_hostnames("gpu[003-004]")


def test_single_process_runtime_plays_server_and_client_host():
    runtime = init_runtime(DistConfig(threads=1), env={})
    assert runtime.is_server and runtime.client_hosts == (0,) and not runtime.distributed
    assert runtime.device.type == "cpu"


def test_the_first_worker_of_a_node_to_meet_a_shared_outcome_reports_it(tmp_path):
    # Whichever local rank gets there first reports (torchrun ends the others as soon as one exits with an
    # error, so waiting for local rank 0 could leave nothing printed); one report per launch and attempt.
    worker = {"LOCAL_RANK": "2", "TORCHELASTIC_RUN_ID": "job-7", "TORCHELASTIC_RESTART_COUNT": "0"}
    assert first_to_report(worker, tmp_path)
    assert not first_to_report({**worker, "LOCAL_RANK": "0"}, tmp_path)
    assert not first_to_report({**worker, "LOCAL_RANK": "1"}, tmp_path)
    assert first_to_report({**worker, "TORCHELASTIC_RESTART_COUNT": "1"}, tmp_path)  # the restart's own report
    assert first_to_report({**worker, "TORCHELASTIC_RUN_ID": "job-8"}, tmp_path)
    assert first_to_report({"SLURM_LOCALID": "1", "SLURM_JOB_ID": "41", "SLURM_STEP_ID": "0"}, tmp_path)
    assert first_to_report({}, tmp_path) and first_to_report({}, tmp_path)  # one process: always
    # LOCAL_RANK without a launcher's run id (DeepSpeed's single-process group sets it): local rank 0 reports,
    # every time, whatever process started it.
    assert first_to_report({"LOCAL_RANK": "0"}, tmp_path) and first_to_report({"LOCAL_RANK": "0"}, tmp_path)
    assert not first_to_report({"LOCAL_RANK": "1"}, tmp_path)
    # No marker can be made (a missing folder): local rank 0 reports, the others do not.
    assert first_to_report({**worker, "LOCAL_RANK": "0"}, tmp_path / "missing")
    assert not first_to_report({**worker, "LOCAL_RANK": "1"}, tmp_path / "missing")
