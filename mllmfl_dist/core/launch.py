"""Where this process sits in the job, as torchrun or srun describe it (environment variables only; no
process group): the rank, the world size, and under Slurm the rendezvous address and port."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mllmfl_dist.core.errors import ConfigError


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as torchrun or srun described it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"  # torchrun | slurm | none


def env_rank() -> int:
    """This process's rank as the launcher set it (torchrun's RANK, else Slurm's SLURM_PROCID; 0 alone)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def read_launch_env(env: dict[str, str] | None = None) -> LaunchEnv:
    """Read torchrun's variables, else those of an srun step with several tasks, else a single process.

    SLURM variables alone do not make a distributed launch: an sbatch script body and an salloc shell carry
    ``SLURM_NTASKS`` (and the batch script ``SLURM_PROCID=0``) but no step, and no other rank would ever join
    a process started there. Such a process with ``SLURM_NTASKS > 1`` is refused (ConfigError, one line);
    inside a step, ``SLURM_STEP_NUM_TASKS`` is the world size and a step of one task runs alone.
    """
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    in_step = "SLURM_STEP_ID" in env and "SLURM_PROCID" in env
    tasks = int(env.get("SLURM_STEP_NUM_TASKS" if in_step else "SLURM_NTASKS", "1") or 1)
    if in_step and tasks > 1:
        return LaunchEnv(int(env["SLURM_PROCID"]), tasks, int(env.get("SLURM_LOCALID", 0)), "slurm")
    if not in_step and tasks > 1:
        raise ConfigError(
            f"SLURM_NTASKS={tasks} but this process was not started by srun (no SLURM_STEP_ID: it runs in an "
            f"sbatch script body or an salloc shell), so no other rank would join it; start the ranks with "
            f"`srun python -m mllmfl_dist ...` (see launch/slurm.sbatch), or run one process with "
            f"`srun --ntasks=1 python -m mllmfl_dist ...`"
        )
    return LaunchEnv()


def slurm_hostnames(nodelist: str) -> list[str]:
    """The host names of a Slurm node list (``gpu[003-005],rack[1-2]-n[01-02]``), expanded by Slurm's own
    ``scontrol show hostnames``; ConfigError naming MASTER_ADDR when it cannot run."""
    try:
        result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ConfigError(
            f"cannot expand the Slurm node list {nodelist!r} with `scontrol show hostnames` "
            f"({err}); set MASTER_ADDR to the host of rank 0"
        ) from None
    hosts = result.stdout.split()
    if result.returncode != 0 or not hosts:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(
            f"`scontrol show hostnames {nodelist}` failed ({detail}); set MASTER_ADDR to the host of rank 0"
        )
    return hosts


# Rank 0's port under Slurm when MASTER_PORT is not set: one per job id, so that two jobs sharing a node do
# not collide, below Linux's ephemeral range (32768-60999) so that no client socket holds it. The sbatch
# scripts (launch/slurm_common.sh) use the same formula.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 15000


def slurm_port(job_id: int) -> int:
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def slurm_rendezvous(env: dict[str, str]) -> tuple[str, str]:
    """``(MASTER_ADDR, MASTER_PORT)`` for ranks started by srun: the variables when set (the sbatch scripts
    set both), else the first host of the step (where srun places task 0) and the job's port."""
    addr = (
        env.get("MASTER_ADDR")
        or slurm_hostnames(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost")[0]
    )
    port = env.get("MASTER_PORT") or str(slurm_port(int(env.get("SLURM_JOB_ID", "0") or 0)))
    return addr, port


def first_to_report(env: Mapping[str, str] | None = None, marker_dir: str | Path | None = None) -> bool:
    """Whether this process is the first of its node's workers of this launch to report an outcome every rank
    meets alike (a config error, a diverged round, a stop), so that each node prints it once.

    Whichever worker claims a marker file first reports it: torchrun and srun end a node's other workers as
    soon as one exits with an error, so leaving the report to local rank 0 could leave nothing printed when
    another rank got there first. The marker (an empty file in ``marker_dir``, default the temp folder) is
    keyed by the workers' common parent (the torchrun agent, or srun's step daemon), the run id and the
    restart attempt. A single process always reports; where no launcher names the run, or no marker can be
    made, local rank 0 does.
    """
    env = os.environ if env is None else env
    local_rank = env.get("LOCAL_RANK", env.get("SLURM_LOCALID"))
    if local_rank is None:
        return True
    run = env.get("TORCHELASTIC_RUN_ID")
    if not run and env.get("SLURM_JOB_ID") and env.get("SLURM_STEP_ID") and "SLURM_LOCALID" in env:
        run = f"{env['SLURM_JOB_ID']}.{env['SLURM_STEP_ID']}"
    if not run:  # LOCAL_RANK without a launcher (set for a library, say): nothing shared to claim against
        return local_rank == "0"
    key = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{run}-{os.getppid()}-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}")
    marker = Path(marker_dir or tempfile.gettempdir()) / f"mllmfl_dist-reported-{key}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return True
    except FileExistsError:
        return False
    except OSError:
        return local_rank == "0"
