"""The CLI in-process (``main(argv)``), as a user runs it: one process playing server and client host."""

import json
from pathlib import Path

import pytest
import torch

from mllmfl_dist.__main__ import main

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.toml"
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def run_cli(*argv: str) -> int:
    return main(list(argv))


def test_federate_writes_metrics_model_and_events_then_a_rerun_does_nothing(tmp_path, capsys):
    sets = ["--set", f"run.root={tmp_path}", "--set", "federated.rounds=3", "--set", "eval.every=2"]
    assert run_cli("federate", str(SMOKE), *sets) == 0
    out = tmp_path / "smoke" / "federated"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [2, 3]  # every 2 rounds, and the last one
    for record in records:
        assert {
            "round",
            "acc",
            "acc_top1",
            "acc_many",
            "acc_medium",
            "acc_few",
            "per_class",
            "round_seconds",
        } <= record.keys()
        assert len(record["per_class"]) == 10 and 0.0 <= record["acc"] <= 1.0
    assert list(out.glob("events.out.tfevents.*")), "TensorBoard events beside metrics.jsonl"
    model = torch.load(out / "model_final.pt", weights_only=True)
    assert "classifier.weight" in model and model["classifier.weight"].shape[0] == 10
    resolved = (tmp_path / "smoke" / "config.toml").read_text()
    assert "rounds = 3" in resolved and 'name = "smoke"' in resolved
    assert "round 3: balanced acc" in capsys.readouterr().out

    before = (out / "rounds.jsonl").read_text()
    mtime = (out / "model_final.pt").stat().st_mtime_ns
    assert run_cli("federate", str(SMOKE), *sets) == 0
    assert (out / "rounds.jsonl").read_text() == before  # no round trained again
    assert (out / "model_final.pt").stat().st_mtime_ns >= mtime

    capsys.readouterr()
    assert run_cli("evaluate", str(SMOKE), "--checkpoint", str(out / "model_final.pt"), *sets) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["acc"] == pytest.approx(records[-1]["acc"])
    assert report["per_class"] == pytest.approx(records[-1]["per_class"])


def test_resume_with_changed_hyperparameters_is_refused_and_keeps_the_checkpoint(tmp_path, capsys):
    sets = ["--set", f"run.root={tmp_path}", "--set", "federated.rounds=1"]
    assert run_cli("federate", str(SMOKE), *sets) == 0
    ckpt = tmp_path / "smoke" / "federated" / "checkpoint.pt"
    saved = ckpt.read_bytes()
    capsys.readouterr()
    assert run_cli("federate", str(SMOKE), *sets, "--set", "federated.lr=0.5", "--set", "federated.rounds=2") == 2
    err = capsys.readouterr().err
    assert "federated.lr: 0.05 -> 0.5" in err and "Traceback" not in err
    assert ckpt.read_bytes() == saved


def test_evaluate_rejects_a_model_of_another_shape(tmp_path, capsys):
    path = tmp_path / "other.pt"
    torch.save({"classifier.weight": torch.zeros(3, 3)}, path)
    assert run_cli("evaluate", str(SMOKE), "--checkpoint", str(path)) == 2
    assert "does not fit" in capsys.readouterr().err


def test_missing_cifar_files_name_the_path_and_the_flag(tmp_path, capsys):
    code = run_cli(
        "federate",
        str(REPO / "configs" / "cifar10_lt.toml"),
        "--set",
        f"data.root={tmp_path / 'nocifar'}",
        "--set",
        f"run.root={tmp_path}",
    )
    err = capsys.readouterr().err
    assert code == 2
    assert str(tmp_path / "nocifar") in err and "data.download" in err and "Traceback" not in err


@pytest.mark.skipif(not FMNIST.exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_lt_rounds_on_real_data_lower_the_test_loss(tmp_path):
    from mllmfl_dist.config import load_config
    from mllmfl_dist.data import normalize
    from mllmfl_dist.stages.inputs import build_data, build_fl_model

    config = REPO / "configs" / "fmnist_lt.toml"
    sets = [f"run.root={tmp_path}", "federated.rounds=2", "log.progress=false"]
    assert run_cli("federate", str(config), *[a for s in sets for a in ("--set", s)]) == 0
    final = json.loads((tmp_path / "fmnist_lt" / "federated" / "summary.json").read_text())["final"]
    assert final["round"] == 2
    # Fashion-MNIST-LT at IF 0.01 has 6000 .. 60 samples per class: Many and Medium classes, no Few.
    assert final["acc_many"] is not None and final["acc_medium"] is not None and final["acc_few"] is None

    cfg = load_config(config, sets)
    data = build_data(cfg)
    # Two rounds leave the model head-biased (balanced test accuracy is still near chance), so learning
    # is checked on the long-tailed training distribution itself.
    pairs = [data.client(c) for c in range(20)]
    x = normalize(torch.cat([p[0] for p in pairs]), data.mean, data.std)
    labels = torch.cat([p[1] for p in pairs])
    trained = build_fl_model(cfg.model, data, cfg.run.seed)
    trained.load_state_dict(torch.load(tmp_path / "fmnist_lt" / "federated" / "model_final.pt", weights_only=True))
    untouched = build_fl_model(cfg.model, data, cfg.run.seed)
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(m.eval()(x), labels).item() for m in (trained, untouched)]
    assert losses[0] < losses[1] - 0.1, losses


def test_unreadable_backbone_file_is_one_message(tmp_path, capsys):
    garbage = tmp_path / "backbone.pt"
    garbage.write_bytes(b"definitely not a torch file")
    code = run_cli(
        "federate",
        str(SMOKE),
        "--set",
        f"run.root={tmp_path}",
        "--set",
        "federated.rounds=1",
        "--set",
        f"model.pretrained_backbone={garbage}",
    )
    err = capsys.readouterr().err
    assert code == 2 and "model.pretrained_backbone" in err and str(garbage) in err and "Traceback" not in err


def test_a_torn_last_metrics_line_is_dropped(tmp_path):
    from mllmfl_dist.core.jsonl import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"round": 1, "acc": 0.5})
    with log.path.open("a") as handle:
        handle.write('{"round": 2, "ac')  # a job killed mid-write
    assert log.records() == [{"round": 1, "acc": 0.5}]
    log.truncate_after(1)
    assert log.path.read_text() == '{"round": 1, "acc": 0.5}\n'


def test_a_moved_and_renamed_run_directory_resumes(tmp_path):
    """Where a run lives is not part of what it computes: run.root and run.name may change on resume."""
    common = ["--set", "log.progress=false", "--set", "log.tensorboard=false"]
    assert (
        run_cli(
            "federate",
            str(SMOKE),
            "--set",
            f"run.root={tmp_path / 'a'}",
            "--set",
            "run.name=first",
            "--set",
            "federated.rounds=2",
            *common,
        )
        == 0
    )
    before = (tmp_path / "a" / "first" / "federated" / "rounds.jsonl").read_text()
    (tmp_path / "a" / "first").rename(tmp_path / "moved")
    assert (
        run_cli(
            "federate",
            str(SMOKE),
            "--set",
            f"run.root={tmp_path}",
            "--set",
            "run.name=moved",
            "--set",
            "federated.rounds=3",
            *common,
        )
        == 0
    )
    assert (
        run_cli(
            "federate",
            str(SMOKE),
            "--set",
            f"run.root={tmp_path}",
            "--set",
            "run.name=straight",
            "--set",
            "federated.rounds=3",
            *common,
        )
        == 0
    )
    moved = [json.loads(line) for line in (tmp_path / "moved" / "federated" / "rounds.jsonl").open()]
    assert [r["round"] for r in moved] == [1, 2, 3]
    assert (tmp_path / "moved" / "federated" / "rounds.jsonl").read_text().startswith(before)  # 1-2 not redone
    a = torch.load(tmp_path / "moved" / "federated" / "model_final.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "federated" / "model_final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
