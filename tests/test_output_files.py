"""Outputs: atomic writes leave no temporary file behind, a killed save's leftovers are removed when the
stage starts again, and a full disk is one line naming the path (a real, size-limited tmpfs)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mllmfl_dist.core import checkpoint
from mllmfl_dist.__main__ import main
from mllmfl_dist.core.checkpoint import OutputError

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.toml"


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    summary = tmp_path / "summary.json"
    checkpoint.write_text_atomic(summary, '{"old": 1}')
    with pytest.raises(UnicodeEncodeError):
        checkpoint.write_text_atomic(summary, "\ud800")  # fails half-way through the write
    model = tmp_path / "model.pt"
    checkpoint.save_atomic({"w": torch.ones(3)}, model)
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        checkpoint.save_atomic({"w": lambda: None}, model)  # not picklable: torch.save fails mid-file
    assert json.loads(summary.read_text()) == {"old": 1}
    assert torch.equal(checkpoint.load(model)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "summary.json"]


def test_temporary_names_are_recognised_and_nothing_else_is_removed(tmp_path):
    for name in (
        ".checkpoint.pt.a1b2c3d4.tmp",
        ".summary.json.tmp",
        ".accuracy.x_9y8z7w.tmp.png",
        "train-000000.tar.gz.partial",
        "notes.tmp",
        ".hidden",
        "checkpoint.pt",
        "a.tmp.txt",
    ):
        (tmp_path / name).write_text("x")
    (tmp_path / ".dir.abcdefgh.tmp").mkdir()  # only files are ever removed
    removed = checkpoint.remove_stale_temps(tmp_path, targets=["checkpoint.pt", "summary.json"])
    assert sorted(p.name for p in removed) == [".checkpoint.pt.a1b2c3d4.tmp", ".summary.json.tmp"]
    removed = checkpoint.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == [".accuracy.x_9y8z7w.tmp.png", "train-000000.tar.gz.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".dir.abcdefgh.tmp",
        ".hidden",
        "a.tmp.txt",
        "checkpoint.pt",
        "notes.tmp",
    ]


KILLED_WRITER = """
import sys, time
from mllmfl_dist.core.checkpoint import atomic_writer
with atomic_writer(sys.argv[1]) as handle:
    handle.write(b"x" * 100000)
    handle.flush()
    print("writing", flush=True)
    time.sleep(120)
"""


def test_a_save_killed_mid_write_leaves_litter_that_the_next_run_removes(tmp_path, capsys):
    """A real SIGKILL inside a save, then a rerun of the stage: the temporary file is gone, the user's
    own files in the folder are not, and the run completes."""
    sets = ["--set", f"run.root={tmp_path}", "--set", "federated.rounds=1", "--set", "log.tensorboard=false"]
    out = tmp_path / "smoke" / "federated"
    out.mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(out / "checkpoint.pt")], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait(timeout=30)
    litter = [p for p in out.iterdir() if p.name.startswith(".checkpoint.pt.")]
    assert len(litter) == 1 and litter[0].stat().st_size == 100000 and not (out / "checkpoint.pt").exists()
    (out / "notes.tmp").write_text("mine")
    assert main(["federate", str(SMOKE), *sets]) == 0
    assert not litter[0].exists()
    assert (out / "notes.tmp").read_text() == "mine" and (out / "checkpoint.pt").is_file()


def test_a_full_disk_is_one_line_naming_the_path_and_keeps_the_old_file(small_disk):
    small_disk = small_disk("256k")
    old = small_disk / "model.pt"
    checkpoint.save_atomic({"w": torch.ones(4)}, old)
    big = {"w": torch.zeros(200_000)}  # 800 KB: more than the disk holds
    with pytest.raises(OutputError, match=r"cannot write .*model\.pt: no space left on the device \(ENOSPC\)"):
        checkpoint.save_atomic(big, old)
    assert torch.equal(checkpoint.load(old)["w"], torch.ones(4))
    with pytest.raises(OutputError, match=r"summary\.json: no space left"):
        checkpoint.write_text_atomic(small_disk / "summary.json", "x" * 400_000)
    with pytest.raises(OutputError, match=r"metrics\.jsonl: no space left"):
        checkpoint.append_text(small_disk / "metrics.jsonl", "y" * 400_000)
    from mllmfl_dist.data.shards import write_shard

    noise = [
        {
            "key": f"k{i}",
            "image_bytes": torch.randint(0, 256, (40_000,), dtype=torch.uint8).numpy().tobytes(),
            "image_ext": "png",
        }
        for i in range(10)
    ]
    with pytest.raises(OutputError, match=r"web-000000\.tar: no space left"):
        write_shard(noise, small_disk / "web-000000.tar")
    assert sorted(p.name for p in small_disk.iterdir()) == ["metrics.jsonl", "model.pt"]


def test_federate_on_a_full_disk_ends_with_one_line_not_a_traceback(small_disk, capsys):
    small_disk = small_disk("256k")
    config = small_disk.parent / "smoke.toml"
    config.write_text(
        SMOKE.read_text()
        + textwrap.dedent("""
        [log]
        tensorboard = false
        progress = false
        """)
    )
    rc = main(
        [
            "federate",
            str(config),
            "--set",
            f"run.root={small_disk}",
            "--set",
            "federated.rounds=1",
            "--set",
            "model.width_scale=4",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("mllmfl_dist: error:")]
    assert len(lines) == 1 and "no space left on the device" in lines[0] and str(small_disk) in lines[0]
    assert "Traceback" not in err and "unexpected pos" not in err


def test_a_metrics_log_with_garbled_bytes_keeps_the_records_before_them(tmp_path):
    from mllmfl_dist.core.jsonl import read_jsonl
    from mllmfl_dist.core.jsonl import read_evaluations

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"round": 1, "acc": 0.5}\n\xff\xfe\x00garbage after a power loss\n')
    assert read_jsonl(path) == [{"round": 1, "acc": 0.5}]
    assert read_evaluations(path) == [{"round": 1, "acc": 0.5}]
