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
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
import torch.distributed as torch_dist

from mllmfl_dist.core.errors import ConfigError, DataError, ModelLoadError, RankLostError
from mllmfl_dist.core.launch import LaunchEnv, read_launch_env, slurm_rendezvous
from mllmfl_dist.core.preflight import check_local_ranks, local_world_size
from mllmfl_dist.core.waits import Heartbeat, Waiting, WaitSettings, first_line, ranks_text

if TYPE_CHECKING:
    from mllmfl_dist.config import DistConfig

SERVER_RANK = 0
# Errors a user can fix: one rank's refusal of this kind is raised alike on every rank.
USER_ERRORS = (ConfigError, DataError, ModelLoadError)
T = TypeVar("T")


@dataclass
class HeldLocks:
    """The run directories this job holds, the same on every rank; the open lock files (whose descriptors carry
    the ``flock``) only on rank 0, which took them. ``command`` names the job in the lock files
    (:mod:`mllmfl_dist.core.run_lock` takes and releases them)."""

    command: str = ""
    dirs: dict[Path, Any] = field(default_factory=dict)  # resolved directory -> lock file handle (rank 0) or None


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    backend: str  # gloo | nccl | none (single process without a process group)
    device: torch.device
    server_hosts_clients: bool
    control_group: Any = None
    # The rendezvous store (prefixed per restart attempt) and the settings of the waits on other ranks.
    store: Any = None
    waits: WaitSettings = field(default_factory=lambda: WaitSettings())
    # This process's sign of life in the store (waits.Heartbeat), so a waiting rank can name a stopped one.
    heartbeat: Any = None
    # This process's stop request (preempt.StopRequest), read by the round loop; None: never asked to stop.
    stop: Any = None
    # The run directories this job holds (run_lock.holding): entered again without a second lock.
    run_locks: HeldLocks = field(default_factory=HeldLocks)

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


def init_runtime(cfg: DistConfig, env: dict[str, str] | None = None, stop: Any = None) -> Runtime:
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
        # Before any group exists: ranks sharing a GPU would otherwise meet NCCL's "Duplicate GPU detected".
        check_local_ranks(local_world_size(os.environ if env is None else env), torch.cuda.device_count(), backend)
        device = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if launch.launcher == "none":
        return Runtime(0, 1, 0, "none", device, cfg.server_hosts_clients, stop=stop)

    if launch.launcher == "slurm":
        addr, port = slurm_rendezvous(dict(os.environ if env is None else env))
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, port
        os.environ.setdefault("RANK", str(launch.rank))
        os.environ.setdefault("WORLD_SIZE", str(launch.world_size))
    waits = WaitSettings(cfg.timeout_minutes, cfg.control_timeout_minutes, cfg.wait_report_seconds)
    store = None
    if not torch_dist.is_initialized():
        store = _rendezvous(launch, cfg)
        torch_dist.init_process_group(
            backend,
            store=store,
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timedelta(minutes=cfg.timeout_minutes),
            device_id=device if backend == "nccl" else None,
        )
    control = torch_dist.new_group(backend="gloo", timeout=timedelta(minutes=cfg.control_timeout_minutes))
    heartbeat = Heartbeat(store, launch.rank) if store is not None else None
    return Runtime(
        launch.rank,
        launch.world_size,
        launch.local_rank,
        backend,
        device,
        cfg.server_hosts_clients,
        control,
        store,
        waits,
        heartbeat,
        stop,
    )


def _rendezvous(launch: LaunchEnv, cfg: DistConfig) -> torch_dist.PrefixStore:
    """The store the process group meets on, once every rank has joined it.

    Under torchrun the agent hosts the store (``TORCHELASTIC_USE_AGENT_STORE``) and keeps it across the
    restarts of ``--max-restarts``; torch's own env:// rendezvous reuses its keys, so a restarted group
    reads the dead workers' addresses and never connects. Each restart attempt gets its own key prefix
    (``TORCHELASTIC_RESTART_COUNT``). Outside torchrun (srun tasks) rank 0 hosts the store. Every rank
    announces itself and waits at most ``dist.init_timeout_minutes`` for the others; on expiry the error
    names the ranks that never came."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    timeout = timedelta(minutes=cfg.init_timeout_minutes)
    try:
        base = torch_dist.TCPStore(
            host,
            port,
            launch.world_size,
            is_master=not agent and launch.rank == 0,
            timeout=timeout,
            wait_for_workers=False,
            multi_tenant=True,
        )
    except (RuntimeError, torch_dist.DistError) as err:
        raise RankLostError(
            f"rank {launch.rank}: cannot reach the rendezvous store at {host}:{port} within "
            f"dist.init_timeout_minutes = {cfg.init_timeout_minutes:g} ({first_line(err)}); is "
            f"rank 0 running, and are MASTER_ADDR / MASTER_PORT right?"
        ) from None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = torch_dist.PrefixStore(f"mllmfl/attempt{attempt}", base)
    keys = [f"joined/{r}" for r in range(launch.world_size)]
    store.set(keys[launch.rank], "1")
    try:
        store.wait(keys, timeout)
    except (RuntimeError, torch_dist.DistError):
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
        raise RankLostError(
            f"rank {launch.rank}: {launch.world_size} ranks were expected ({launch.launcher}), but rank(s) "
            f"{ranks_text(missing)} did not join within dist.init_timeout_minutes = {cfg.init_timeout_minutes:g}; "
            f"were they started (one srun step with all tasks, or torchrun on every node)?"
        ) from None
    return store


def _round_wait(runtime: Runtime, what: str) -> Waiting:
    return Waiting(runtime, what, "dist.timeout_minutes", runtime.waits.round_minutes)


def _control_wait(runtime: Runtime, what: str) -> Waiting:
    return Waiting(runtime, what, "dist.control_timeout_minutes", runtime.waits.control_minutes)


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
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def shutdown(runtime: Runtime) -> None:
    if runtime.heartbeat is not None:
        runtime.heartbeat.stop()
    if runtime.distributed and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_reduce_sum_(runtime: Runtime, flat: torch.Tensor, what: str = "the round's all_reduce") -> torch.Tensor:
    """Sum a flat buffer over all ranks, in place (the round's one aggregation collective)."""
    if runtime.distributed:
        with _round_wait(runtime, what):
            torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
    return flat


def broadcast_from_server_(
    runtime: Runtime, flat: torch.Tensor, what: str = "rank 0's broadcast of the global model"
) -> torch.Tensor:
    """Overwrite ``flat`` on every rank with rank 0's copy, in place."""
    if runtime.distributed:
        with _round_wait(runtime, what):
            torch_dist.broadcast(flat, src=SERVER_RANK)
    return flat


def stage_barrier(runtime: Runtime, what: str = "the end of the stage", *, clients_idle: bool = False) -> None:
    """Wait for every rank (between stages), on the rendezvous store, each rank with the timeout of what it
    waits for: a rank waiting for work that may take hours (another rank's annotation or DWP, rank 0's
    server-side stages) waits up to ``dist.control_timeout_minutes``; with ``clients_idle`` (the client
    hosts have nothing left to do) rank 0 waits for them only ``dist.timeout_minutes``."""
    if not runtime.distributed:
        return
    short = clients_idle and runtime.is_server
    waiting = _round_wait(runtime, what) if short else _control_wait(runtime, what)
    with waiting:
        runtime.store.wait(
            [waiting.arrival_key(r) for r in range(runtime.world_size)], timedelta(minutes=waiting.minutes)
        )


def broadcast_object(runtime: Runtime, obj: Any, what: str = "a value from rank 0") -> Any:
    """Rank 0's picklable ``obj`` on every rank (small control values only), over the control group."""
    if not runtime.distributed:
        return obj
    box = [obj]
    with _control_wait(runtime, what):
        torch_dist.broadcast_object_list(box, src=SERVER_RANK, group=runtime.control_group)
    return box[0]


def server_decides(
    runtime: Runtime,
    decide: Callable[[], T],
    what: str,
    *,
    catch: tuple[type[BaseException], ...] = USER_ERRORS,
    as_error: Callable[[str], Exception] | None = None,
) -> T:
    """Rank 0 runs ``decide`` (it reads a checkpoint, a cache, the data) and every rank gets its result (small
    and picklable), or every rank raises its failure: an error of ``catch`` on rank 0 becomes the same error
    class with the same one-line message on every rank (``as_error(message)`` when given; an error outside
    :data:`USER_ERRORS` becomes a ConfigError ``"<type>: <message>"``). So a refusal ends all ranks alike
    instead of leaving the others waiting for rank 0."""
    # share=True: every rank holds decide's value, so None here is a None that decide returned
    return cast(T, _from_server(runtime, decide, what, catch, as_error, share=True))


def server_first(
    runtime: Runtime, act: Callable[[], T], what: str, *, catch: tuple[type[BaseException], ...] = USER_ERRORS
) -> T | None:
    """Rank 0 runs ``act`` before the others do their part: its value stays on rank 0 (None elsewhere) and only
    whether it failed reaches every rank, which then raises its error as :func:`server_decides` does."""
    return _from_server(runtime, act, what, catch, None, share=False)


def _from_server(
    runtime: Runtime,
    action: Callable[[], T],
    what: str,
    catch: tuple[type[BaseException], ...],
    as_error: Callable[[str], Exception] | None,
    share: bool,
) -> T | None:
    value, failure = None, None
    if runtime.is_server:
        try:
            value = action()
        except catch as err:
            user = isinstance(err, USER_ERRORS)
            failure = (type(err) if user else ConfigError, str(err) if user else f"{type(err).__name__}: {err}")
    shared, failure = broadcast_object(runtime, (value if share else None, failure), what)
    if failure is not None:
        cls, message = failure
        raise as_error(message) if as_error is not None else cls(message)
    return value if runtime.is_server else shared


def gather_objects(runtime: Runtime, obj: Any, what: str = "every rank's records") -> list[Any]:
    """Every rank's picklable ``obj`` (small records), in rank order, over the control group."""
    if not runtime.distributed:
        return [obj]
    gathered: list[Any] = [None] * runtime.world_size
    with _control_wait(runtime, what):
        torch_dist.all_gather_object(gathered, obj, group=runtime.control_group)
    return gathered


def broadcast_control_(runtime: Runtime, tensor: torch.Tensor, what: str = "data from rank 0") -> torch.Tensor:
    """Rank 0's CPU ``tensor`` on every rank, in place, over the long-timeout control group (one-off data
    such as cached teacher outputs, outside the round loop)."""
    if runtime.distributed:
        with _control_wait(runtime, what):
            torch_dist.broadcast(tensor, src=SERVER_RANK, group=runtime.control_group)
    return tensor


def all_reduce_control_(
    runtime: Runtime, tensor: torch.Tensor, what: str = "work split over the ranks"
) -> torch.Tensor:
    """Sum a CPU ``tensor`` over ranks, in place, over the control group (one-off work split over ranks)."""
    if runtime.distributed:
        with _control_wait(runtime, what):
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM, group=runtime.control_group)
    return tensor


def max_over_ranks(runtime: Runtime, value: float, what: str = "every rank's resource report") -> float:
    """The largest ``value`` any rank holds (for resource reports), on the main group: every rank is done
    with its work here, so the wait is bounded by ``dist.timeout_minutes``."""
    if not runtime.distributed:
        return value
    box = torch.tensor([value], dtype=torch.float64, device=runtime.device)
    with _round_wait(runtime, what):
        torch_dist.all_reduce(box, op=torch_dist.ReduceOp.MAX)
    return float(box.item())
