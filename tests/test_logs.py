"""Logs that read well in a file: with stderr not a terminal, no progress bar, a data line, one line per
evaluation and one per stage."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_federate_with_stderr_in_a_file_writes_one_line_per_evaluation(tmp_path) -> None:
    log = tmp_path / "stderr.log"
    with log.open("w") as handle:  # a file, as under SLURM or nohup
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "mllmfl_dist",
                "federate",
                "configs/smoke.toml",
                "--set",
                f"run.root={tmp_path}",
                "--set",
                "federated.rounds=4",
                "--set",
                "eval.every=2",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=handle,
            text=True,
            timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    assert done.returncode == 0
    text = log.read_text()
    assert "\r" not in text and "round/s" not in text  # no tqdm bar
    lines = text.splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[rank 0\] INFO ", line) for line in lines), lines
    assert len(lines) == 5, lines  # data, stage start, rounds 2 and 4, stage end
    assert re.search(
        r"data: synthetic, 10 classes, \d+ training images \(per class [\d ]+\), 500 test images; "
        r"20 clients \(dirichlet alpha 0.5\) of \d+/\d+/\d+ images \(min/median/max\)",
        lines[0],
    )
    assert "federated: rounds 1-4, fedavg, 6 of 20 clients per round" in lines[1]
    for line, round_index in zip(lines[2:4], (2, 4)):
        assert re.search(
            rf"round {round_index}/4: acc \d\.\d{{4}} \(many \d\.\d{{4}}, medium \d\.\d{{4}}, few -\), "
            r"\d+\.\d\d s/round$",
            line,
        ), line
    assert re.search(r"federated: rounds 1-4 done in \d+\.\d s", lines[4])


def test_hugging_face_bars_are_off_on_other_ranks_and_in_files(monkeypatch) -> None:
    from mllmfl_dist.core import progress

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: True)
    progress.quiet_library_bars(0)
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ  # rank 0 at a terminal keeps its bars
    progress.quiet_library_bars(2)
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: False)
    progress.quiet_library_bars(0)
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
