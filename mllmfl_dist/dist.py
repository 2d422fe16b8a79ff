"""Process-group runtime: the only module that imports torch.distributed.

Rank 0 is the server; ranks 1..W-1 host clients; with W == 1 the single rank plays both. The round
loop needs exactly two collectives, both on flat buffers: one all_reduce(SUM) carrying the weighted sum
of the clients' models (plus the total weight), and one broadcast of the new global model. Everything
else (stage barriers, small control values) goes over a gloo control group whose timeout is long, so
ranks waiting while rank 0 runs hours of server-side work do not trip the collective timeout.
"""

from __future__ import annotations

import atexit
import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist

from mllmfl_dist.config import ConfigError, DistConfig

SERVER_RANK = 0


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as torchrun or srun described it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"  # torchrun | slurm | none


def read_launch_env(env: dict[str, str] | None = None) -> LaunchEnv:
    """Read torchrun's variables, else those of an srun step with several tasks, else a single process.

    SLURM variables alone do not make a distributed launch: an sbatch script body and an salloc shell carry
    ``SLURM_NTASKS`` (and the batch script ``SLURM_PROCID=0``) but no step, and no other rank would ever join
    a process started there. Such a process with ``SLURM_NTASKS > 1`` is refused (ConfigError, one line);
    inside a step, ``SLURM_STEP_NUM_TASKS`` is the world size and a step of one task runs alone.
    """
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun"
        )
    in_step = "SLURM_STEP_ID" in env and "SLURM_PROCID" in env
    tasks = int(env.get("SLURM_STEP_NUM_TASKS" if in_step else "SLURM_NTASKS", "1") or 1)
    if in_step and tasks > 1:
        return LaunchEnv(int(env["SLURM_PROCID"]), tasks, int(env.get("SLURM_LOCALID", 0)), "slurm")
    if not in_step and tasks > 1:
        raise ConfigError(
            f"SLURM_NTASKS={tasks} but this process was not started by srun (no SLURM_STEP_ID: it runs in an "
            f"sbatch script body or an salloc shell), so no other rank would join it; start the ranks with "
            f"`srun python -m mllmfl_dist ...` (see launch/slurm.sbatch), or run one process with "
            f"`srun --ntasks=1 python -m mllmfl_dist ...`")
    return LaunchEnv()


def slurm_hostnames(nodelist: str) -> list[str]:
    """The host names of a Slurm node list (``gpu[003-005],rack[1-2]-n[01-02]``), expanded by Slurm's own
    ``scontrol show hostnames``; ConfigError naming MASTER_ADDR when it cannot run."""
    try:
        result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ConfigError(f"cannot expand the Slurm node list {nodelist!r} with `scontrol show hostnames` "
                          f"({err}); set MASTER_ADDR to the host of rank 0") from None
    hosts = result.stdout.split()
    if result.returncode != 0 or not hosts:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"`scontrol show hostnames {nodelist}` failed ({detail}); set MASTER_ADDR to the host "
                          f"of rank 0")
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
    addr = env.get("MASTER_ADDR") or slurm_hostnames(
        env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost")[0]
    port = env.get("MASTER_PORT") or str(slurm_port(int(env.get("SLURM_JOB_ID", "0") or 0)))
    return addr, port


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    backend: str  # gloo | nccl | none (single process without a process group)
    device: torch.device
    server_hosts_clients: bool
    control_group: Any = None

    @property
    def is_server(self) -> bool:
        return self.rank == SERVER_RANK

    @property
    def client_hosts(self) -> tuple[int, ...]:
        if self.world_size == 1 or self.server_hosts_clients:
            return tuple(range(self.world_size))
        return tuple(range(1, self.world_size))

    @property
    def distributed(self) -> bool:
        return self.backend != "none"


def init_runtime(cfg: DistConfig, env: dict[str, str] | None = None) -> Runtime:
    """Join the job's process group (or run alone) and pin this rank to its device."""
    launch = read_launch_env(env)
    torch.set_num_threads(cfg.threads)
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("dist.backend = 'nccl' needs CUDA, which is not available; use 'gloo' or 'auto'")
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if launch.launcher == "none":
        return Runtime(0, 1, 0, "none", device, cfg.server_hosts_clients)

    if launch.launcher == "slurm":
        addr, port = slurm_rendezvous(dict(os.environ if env is None else env))
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, port
        os.environ.setdefault("RANK", str(launch.rank))
        os.environ.setdefault("WORLD_SIZE", str(launch.world_size))
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(
            backend,
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timedelta(minutes=cfg.timeout_minutes),
            device_id=device if backend == "nccl" else None,
        )
    control = torch_dist.new_group(backend="gloo", timeout=timedelta(minutes=cfg.control_timeout_minutes))
    return Runtime(
        launch.rank, launch.world_size, launch.local_rank, backend, device, cfg.server_hosts_clients, control
    )


def ensure_process_group(runtime: Runtime) -> None:
    """A process group even for a single process, for libraries that insist on one (DeepSpeed).

    A single process (``runtime.backend == "none"``) gets a one-rank group on an in-memory store (no port).
    It lives until the process exits: DeepSpeed caches its groups in module globals, so a destroyed and
    re-created group would leave it holding dead handles on the next run in the same process.
    """
    os.environ.setdefault("LOCAL_RANK", str(runtime.local_rank))
    if torch_dist.is_initialized():
        return
    if runtime.distributed:
        raise RuntimeError("the runtime is distributed but torch.distributed is not initialised")
    backend = "nccl" if runtime.device.type == "cuda" else "gloo"
    torch_dist.init_process_group(backend, store=torch_dist.HashStore(), rank=0, world_size=1)
    atexit.register(lambda: torch_dist.is_initialized() and torch_dist.destroy_process_group())


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_reduce_sum_(runtime: Runtime, flat: torch.Tensor) -> torch.Tensor:
    """Sum a flat buffer over all ranks, in place (the round's one aggregation collective)."""
    if runtime.distributed:
        torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
    return flat


def broadcast_from_server_(runtime: Runtime, flat: torch.Tensor) -> torch.Tensor:
    """Overwrite ``flat`` on every rank with rank 0's copy, in place."""
    if runtime.distributed:
        torch_dist.broadcast(flat, src=SERVER_RANK)
    return flat


def stage_barrier(runtime: Runtime) -> None:
    """Wait for every rank on the long-timeout control group (between stages)."""
    if runtime.distributed:
        torch_dist.barrier(group=runtime.control_group)


def broadcast_object(runtime: Runtime, obj: Any) -> Any:
    """Rank 0's picklable ``obj`` on every rank (small control values only), over the control group."""
    if not runtime.distributed:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=SERVER_RANK, group=runtime.control_group)
    return box[0]


def gather_objects(runtime: Runtime, obj: Any) -> list[Any]:
    """Every rank's picklable ``obj`` (small records), in rank order, over the control group."""
    if not runtime.distributed:
        return [obj]
    gathered: list[Any] = [None] * runtime.world_size
    torch_dist.all_gather_object(gathered, obj, group=runtime.control_group)
    return gathered


def broadcast_control_(runtime: Runtime, tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's CPU ``tensor`` on every rank, in place, over the long-timeout control group (one-off data
    such as cached teacher outputs, outside the round loop)."""
    if runtime.distributed:
        torch_dist.broadcast(tensor, src=SERVER_RANK, group=runtime.control_group)
    return tensor


def all_reduce_control_(runtime: Runtime, tensor: torch.Tensor) -> torch.Tensor:
    """Sum a CPU ``tensor`` over ranks, in place, over the control group (one-off work split over ranks)."""
    if runtime.distributed:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM, group=runtime.control_group)
    return tensor


def max_over_ranks(runtime: Runtime, value: float) -> float:
    """The largest ``value`` any rank holds (for resource reports), over the control group."""
    if not runtime.distributed:
        return value
    box = torch.tensor([value], dtype=torch.float64)
    torch_dist.all_reduce(box, op=torch_dist.ReduceOp.MAX, group=runtime.control_group)
    return float(box.item())


def any_rank(runtime: Runtime, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (a stop request), over the control group: one
    all_reduce of a single number, so all ranks take the same branch after it."""
    if not runtime.distributed:
        return bool(flag)
    box = torch.tensor([1 if flag else 0], dtype=torch.int32)
    torch_dist.all_reduce(box, op=torch_dist.ReduceOp.MAX, group=runtime.control_group)
    return bool(box.item())
