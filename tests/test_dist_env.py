"""How a process finds its place in the job: torchrun's variables, SLURM's, or neither."""

import pytest

from mllmfl_dist.config import DistConfig
from mllmfl_dist.dist import first_slurm_host, init_runtime, read_launch_env


def test_torchrun_environment_wins():
    env = {"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "SLURM_PROCID": "7", "SLURM_NTASKS": "8"}
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (2, 3, 0, "torchrun")


def test_slurm_environment_without_torchrun():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (5, 8, 1, "slurm")


def test_single_slurm_task_or_nothing_is_one_process():
    assert read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "none"
    assert read_launch_env({}).world_size == 1


@pytest.mark.parametrize("nodelist, host", [
    ("gpu[003-005,010],cpu1", "gpu003"), ("node7", "node7"), ("a[1,4]", "a1"), ("n[08-09]", "n08"),
])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_single_process_runtime_plays_server_and_client_host():
    runtime = init_runtime(DistConfig(threads=1), env={})
    assert runtime.is_server and runtime.client_hosts == (0,) and not runtime.distributed
    assert runtime.device.type == "cpu"
