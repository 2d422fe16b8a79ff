"""Real launches for the tests: torchrun on this host, and a throw-away Slurm (launch/local_slurm.sh)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.toml"
LOCAL_SLURM = REPO / "launch" / "local_slurm.sh"


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous address the test passes to its processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher variables (a test session may itself run under
    torchrun or Slurm), plus ``extra``."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "TORCHELASTIC"))}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def sets(*overrides: str) -> list[str]:
    return [a for s in overrides for a in ("--set", s)]


# Quiet runs with short CReFF server steps, for tests that need CReFF's round rather than its result.
FAST = [
    "log.progress=false",
    "log.tensorboard=false",
    "creff.match_epochs=10",
    "creff.crt_epochs=10",
    "creff.features_per_class=20",
]


def cli(*argv: str, sets=()) -> int:
    """The CLI in this process (``python -m mllmfl_dist ARGV --set S ...``); its exit code."""
    from mllmfl_dist.__main__ import main

    return main([*argv, *[a for s in sets for a in ("--set", s)]])


def torchrun(
    nproc: int, root: Path, *overrides: str, rdzv: list[str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m mllmfl_dist federate configs/smoke.toml --set ...``
    (or, with ``rdzv``, those rendezvous arguments instead of --standalone)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *(rdzv or ["--standalone"]),
        f"--nproc_per_node={nproc}",
        "-m",
        "mllmfl_dist",
        "federate",
        str(SMOKE),
        *sets(f"run.root={root}", *overrides),
    ]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=clean_env())


def final_model(root: Path, name: str = "smoke") -> dict[str, torch.Tensor]:
    return torch.load(root / name / "federated" / "model_final.pt", weights_only=True)


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


class SlurmUnavailable(Exception):
    pass


@dataclass
class LocalSlurm:
    """A Slurm cluster started by launch/local_slurm.sh in ``directory`` (root only)."""

    directory: Path
    nodes: list[str]
    startup_seconds: float

    @property
    def conf(self) -> Path:
        return self.directory / "slurm.conf"

    @classmethod
    def start(cls, directory: Path, timeout: float = 120) -> LocalSlurm:
        if os.geteuid() != 0:
            raise SlurmUnavailable("the local Slurm needs root (slurmd starts jobs as their user)")
        missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(t) is None]
        if missing:
            raise SlurmUnavailable(
                f"{', '.join(missing)} not installed (apt-get install slurmctld slurmd "
                f"slurm-client munge; .ci/run does it)"
            )
        started = time.perf_counter()
        try:
            result = subprocess.run(
                ["bash", str(LOCAL_SLURM), "start", str(directory)], capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            subprocess.run(["bash", str(LOCAL_SLURM), "stop", str(directory)], timeout=60)
            raise SlurmUnavailable(f"launch/local_slurm.sh start did not finish within {timeout:.0f} s") from None
        if result.returncode != 0:
            raise SlurmUnavailable(f"launch/local_slurm.sh start failed: {result.stderr.strip()[-500:]}")
        slurm = cls(directory, [], time.perf_counter() - started)
        slurm.nodes = slurm.run(["sinfo", "-h", "-N", "-o", "%N"]).stdout.split()
        return slurm

    def stop(self) -> None:
        subprocess.run(["bash", str(LOCAL_SLURM), "stop", str(self.directory)], capture_output=True, timeout=120)

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(SLURM_CONF=str(self.conf), **extra)

    def run(self, command: list[str], timeout: float = 60, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=self.env(**env))

    def sbatch(self, options: list[str], script: str, args: list[str], **env: str) -> int:
        """Submit (from the repository, as a user would) and return the job id."""
        result = self.run(["sbatch", "--parsable", *options, script, *args], **env)
        assert result.returncode == 0, result.stderr
        return int(result.stdout.strip().split(";")[0])

    def state(self, job: int) -> str:
        out = self.run(["scontrol", "show", "job", "-o", str(job)]).stdout
        match = re.search(r"JobState=(\S+)", out)
        return match.group(1) if match else "UNKNOWN"

    def wait(
        self,
        job: int,
        timeout: float = 600,
        final: tuple[str, ...] = (
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "BOOT_FAIL",
            "DEADLINE",
        ),
    ) -> str:
        """Poll until the job reaches a final state; cancel it and fail when it does not in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state(job)
            if state in final:
                return state
            time.sleep(0.5)
        self.run(["scancel", str(job)])
        raise AssertionError(f"job {job} still {self.state(job)} after {timeout:.0f} s")

    def sacct(self, job: int) -> list[dict[str, str]]:
        """The job's records in the job-completion log (``sacct -c``: no slurmdbd here), one per run."""
        fields = "JobID,JobName,Partition,NNodes,NCPUS,State,ExitCode,Elapsed"
        out = self.run(["sacct", "-c", "-P", "-n", f"--format={fields}", "-j", str(job)]).stdout
        return [dict(zip(fields.split(","), line.split("|"))) for line in out.splitlines() if line]

    def sacct_table(self, job: int) -> str:
        return self.run(
            ["sacct", "-c", "-j", str(job), "--format=JobID,JobName,Partition,NNodes,NCPUS,State,ExitCode,Elapsed"]
        ).stdout
