"""One job per run directory (core/run_lock.py), with real processes: two torchrun launches on one run
directory, a holder killed with SIGKILL, ``report`` beside a live run and beside another report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launchers import REPO, SMOKE, clean_env, cli, final_model, max_abs_difference, sets

QUIET = ("log.progress=false",)


def federate(root: Path, nproc: int | None = None) -> subprocess.Popen:
    """``federate configs/smoke.toml`` into ``root``: under ``torchrun --standalone`` with ``nproc`` ranks, or
    one plain process."""
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    python = [sys.executable, *launcher, "-m", "mllmfl_dist"] if launcher else [sys.executable, "-m", "mllmfl_dist"]
    return subprocess.Popen(
        [*python, "federate", str(SMOKE), *sets(f"run.root={root}", *QUIET)],
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def holder_pid(lock: Path, *jobs: subprocess.Popen) -> int:
    """The pid the lock file names, once one does (every job still running)."""
    deadline = time.monotonic() + 300
    while True:
        try:
            return json.loads(lock.read_text())["pid"]
        except (OSError, ValueError, KeyError):
            pass
        for job in jobs:
            assert job.poll() is None, job.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no process took the lock"
        time.sleep(0.05)


def descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return False


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("mllmfl_dist: error:")]


def test_two_torchrun_launches_on_one_run_dir_the_second_exits_2_and_the_first_is_untouched(tmp_path, smoke_reference):
    run_dir = tmp_path / "smoke"
    jobs = [federate(tmp_path, nproc=2), federate(tmp_path, nproc=2)]  # started together
    try:
        pid = holder_pid(run_dir / "run.lock", *jobs)
        # Rank 0 of the winner stops while it holds the lock, so the loser meets it however late it starts.
        os.kill(pid, signal.SIGSTOP)
        winner, loser = jobs if descends_from(pid, jobs[0].pid) else jobs[::-1]
        before = contents(run_dir)
        _, loser_err = loser.communicate(timeout=300)
        after = contents(run_dir)
        os.kill(pid, signal.SIGCONT)
        _, winner_err = winner.communicate(timeout=600)
    finally:
        for job in jobs:
            job.kill()

    assert "exitcode  : 2" in loser_err and "exitcode  : 1" not in loser_err, loser_err[-3000:]
    lines = error_lines(loser_err)  # every rank refused, one printed (torchrun's failure block quotes it)
    assert len(lines) == 1, loser_err[-3000:]
    assert f"{run_dir} is in use by `federate` (pid {pid} on host " in lines[0], lines[0]
    assert "torchrun run " in lines[0]
    assert after == before  # the loser wrote nothing, not even config.toml or a log
    assert winner.returncode == 0, winner_err[-3000:]
    rounds = [json.loads(line)["round"] for line in (run_dir / "federated" / "rounds.jsonl").read_text().splitlines()]
    assert rounds == list(range(1, 11))  # one trajectory, each round once
    assert max_abs_difference(final_model(tmp_path), smoke_reference(2)) == 0.0  # as a run alone, bit for bit


def hold_report_lock(report_dir: Path) -> subprocess.Popen:
    """Another process holding ``report_dir`` as a ``report`` does while it writes, until its stdin closes."""
    code = (
        "import sys; from mllmfl_dist.core.run_lock import holding_report\n"
        "with holding_report(sys.argv[1], 'report'):\n    print('held', flush=True); sys.stdin.read()"
    )
    helper = subprocess.Popen(
        [sys.executable, "-c", code, str(report_dir)],
        cwd=REPO,
        env=clean_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert helper.stdout.readline() == "held\n"
    return helper


def test_a_killed_holder_frees_the_run_and_report_works_beside_a_live_run(tmp_path, smoke_reference, capsys):
    run_dir = tmp_path / "smoke"
    job = federate(tmp_path)
    try:
        pid = holder_pid(run_dir / "run.lock", job)
        rounds = run_dir / "federated" / "rounds.jsonl"
        deadline = time.monotonic() + 300
        while not rounds.exists() or len(rounds.read_text().splitlines()) < 2:
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
            time.sleep(0.1)
        os.kill(pid, signal.SIGSTOP)  # a live run that holds its directory
        capsys.readouterr()

        # report locks only report/: it works on the live run ...
        assert cli("report", str(run_dir)) == 0
        assert (run_dir / "report" / "report.md").is_file()
        # ... and a second report while one writes is refused, naming it.
        helper = hold_report_lock(run_dir / "report")
        try:
            assert cli("report", str(run_dir)) == 2
            lines = error_lines(capsys.readouterr().err)
            assert len(lines) == 1 and f"is in use by `report` (pid {helper.pid} on host " in lines[0], lines
        finally:
            helper.communicate(input="", timeout=60)
        assert cli("report", str(run_dir)) == 0

        # While the holder lives, federate on its directory is refused; once it is killed, the rerun resumes.
        assert cli("federate", str(SMOKE), sets=(f"run.root={tmp_path}", *QUIET)) == 2
        assert f"(pid {pid} on host " in error_lines(capsys.readouterr().err)[0]
        kept = rounds.read_text().splitlines()[:1]  # round 2's record is written: round 1's checkpoint is
        os.kill(pid, signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        job.kill()
    assert cli("federate", str(SMOKE), sets=(f"run.root={tmp_path}", *QUIET)) == 0
    lines = rounds.read_text().splitlines()
    assert lines[:1] == kept  # resumed: the killed run's rounds (with their end times) were not redone
    assert [json.loads(line)["round"] for line in lines] == list(range(1, 11))
    assert max_abs_difference(final_model(tmp_path), smoke_reference(2)) <= 1e-6


def test_a_job_enters_a_directory_it_holds_again_and_frees_it_at_the_end(tmp_path):
    import torch

    from mllmfl_dist.core.dist import Runtime
    from mllmfl_dist.core.run_lock import RunDirBusyError, holding

    runtime = Runtime(0, 1, 0, "none", torch.device("cpu"), False)
    other = Runtime(0, 1, 0, "none", torch.device("cpu"), False)  # another job in this process: its own locks
    with holding(runtime, tmp_path, "run"):
        with holding(runtime, tmp_path / ".." / tmp_path.name):  # a stage of the same job, another spelling
            with pytest.raises(RunDirBusyError, match=f"in use by `run` \\(pid {os.getpid()} "):
                with holding(other, tmp_path, "federate"):
                    pass
        assert runtime.run_locks.dirs
    assert not runtime.run_locks.dirs
    with holding(other, tmp_path, "federate"):  # freed
        pass
