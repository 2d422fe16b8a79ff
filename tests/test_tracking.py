"""Experiment tracking: a real federate run logs its scalars to TensorBoard, to W&B in offline mode and to
MLflow's local store, each read back from what the backend wrote; a failing tracker does not stop a run."""

from __future__ import annotations

import glob
import json
import logging
import struct
from pathlib import Path

import pytest

from mllmfl_dist.__main__ import main
from mllmfl_dist.tracking import flatten_scalars

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.toml"


def test_flatten_scalars_spreads_nested_values_and_skips_what_is_not_a_number() -> None:
    record = {
        "round": 3,
        "acc": 0.5,
        "acc_few": None,
        "flag": True,
        "name": "x",
        "per_class": [0.25, float("nan")],
        "before_align": {"acc": 0.4, "per_class": [0.1, 0.2]},
    }
    got = flatten_scalars(record, "eval/", ["T-shirt/top", "Trouser"])
    assert got == {
        "eval/round": 3.0,
        "eval/acc": 0.5,
        "eval/per_class/T-shirt_top": 0.25,
        "eval/before_align/acc": 0.4,
        "eval/before_align/per_class/T-shirt_top": 0.1,
        "eval/before_align/per_class/Trouser": 0.2,
    }


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of every offline W&B run under ``run_dir``, read from the .wandb files (W&B's
    LevelDB-style record log: a 7-byte header, then 32 KiB blocks of records with 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))):
        data = Path(path).read_bytes()
        ident, magic, _version = struct.unpack("<4sHB", data[:7])
        assert ident == b":W&B" and magic == 0xBEE1
        position, pending = 7, b""
        while position + 7 <= len(data):
            left = 32768 - position % 32768
            _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
            if left < 7 or (kind == 0 and length == 0):  # block trailer / padding
                position += left
                continue
            chunk = data[position + 7 : position + 7 + length]
            position += 7 + length
            pending = chunk if kind in (1, 2) else pending + chunk  # FULL, FIRST | MIDDLE, LAST
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                if record.WhichOneof("record_type") == "history":
                    rows.append(
                        {
                            item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item
                        }
                    )
    return rows


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tensorboard_config(directory: Path):
    """The hparams (HPARAMS tab) and the config text TensorBoard holds for ``directory``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(directory), size_guidance={"tensors": 0})
    events.Reload()
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    return hparams, text


def test_federate_logs_to_tensorboard_wandb_offline_and_mlflow(tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network; log.wandb_mode says the same
    monkeypatch.setenv("WANDB_SILENT", "true")
    sets = [
        f"run.root={tmp_path}",
        "federated.rounds=2",
        "eval.every=1",
        "log.progress=false",
        "log.wandb=true",
        "log.wandb_mode=offline",
        "log.mlflow=true",
        # alignment on a held-out set: before/after-alignment accuracy and align_loss
        "align.every=1",
        "align.source=holdout",
        "data.server_holdout_per_class=5",
        "align.steps=2",
    ]
    argv = ["federate", str(SMOKE)]
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 0
    run_dir = tmp_path / "smoke"
    ids = json.loads((run_dir / "trackers.json").read_text())
    partition = json.loads((run_dir / "federated" / "partition.json").read_text())
    assert len(partition["class_counts"]) == 20 == len(partition["client_sizes"])
    assert [sum(row) for row in partition["class_counts"]] == partition["client_sizes"]
    assert [sum(col) for col in zip(*partition["class_counts"])] == partition["train_class_counts"]

    scalars = tensorboard_scalars(run_dir / "federated")
    for tag in (
        "eval/acc",
        "eval/acc_many",
        "eval/per_class/class_0",
        "eval/before_align/acc",
        "round/seconds",
        "round/bytes_all_reduced",
        "round/train_loss",
        "round/align_loss",
    ):
        assert [step for step, _ in scalars[tag]] == [1, 2], tag
    records = [json.loads(line) for line in (run_dir / "federated" / "metrics.jsonl").read_text().splitlines()]
    hparams, config_text = tensorboard_config(run_dir / "federated")
    assert hparams["federated.lr"].number_value == 0.05 and hparams["federated.strategy"].string_value == "fedavg"
    assert 'strategy = "fedavg"' in config_text and "[partition]" in config_text
    assert [v for _, v in scalars["eval/acc"]] == pytest.approx([r["acc"] for r in records], abs=1e-6)
    assert all(v > 0 for _, v in scalars["round/train_loss"])

    history = wandb_history(run_dir)
    acc_rows = [row for row in history if "eval/acc" in row]
    assert [row["round"] for row in acc_rows] == [1, 2]
    assert [row["eval/acc"] for row in acc_rows] == pytest.approx([r["acc"] for r in records])
    assert any("round/train_loss" in row for row in history)
    assert list(run_dir.glob(f"wandb/offline-run-*-{ids['wandb']}"))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(ids["mlflow"])
    assert run.data.params["federated.lr"] == "0.05" and run.data.params["run.name"] == "smoke"
    history = client.get_metric_history(ids["mlflow"], "eval/acc")
    assert [m.step for m in history] == [r["round"] for r in records]
    assert [m.value for m in history] == pytest.approx([r["acc"] for r in records])
    assert {m.step for m in client.get_metric_history(ids["mlflow"], "round/train_loss")} == {1, 2}
    assert "config.toml" in [a.path for a in client.list_artifacts(ids["mlflow"])]

    # A resumed run continues the same W&B and MLflow runs.
    argv += ["--set", "federated.rounds=3"]
    assert main(argv) == 0
    assert json.loads((run_dir / "trackers.json").read_text()) == ids
    steps = [m.step for m in client.get_metric_history(ids["mlflow"], "eval/acc")]
    assert steps == [1, 2, 3]
    assert [row["round"] for row in wandb_history(run_dir) if "eval/acc" in row] == [1, 2, 3]


def test_a_tracker_that_cannot_start_is_reported_and_the_run_goes_on(tmp_path, caplog) -> None:
    pytest.importorskip("mlflow")
    argv = [
        "federate",
        str(SMOKE),
        "--set",
        f"run.root={tmp_path}",
        "--set",
        "federated.rounds=1",
        "--set",
        "log.progress=false",
        "--set",
        "log.mlflow=true",
        "--set",
        "log.mlflow_uri=nosuchscheme://x",
    ]
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    assert any("mlflow could not start" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "smoke" / "federated" / "model_final.pt").is_file()


def test_a_missing_tracker_package_is_a_config_error(monkeypatch, capsys) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(["federate", str(SMOKE), "--set", "log.wandb=true"]) == 2
    assert "mllmfl-dist[wandb]" in capsys.readouterr().err
