"""CReFF and CLIP2FL through the CLI in-process, and ``compare``, on the synthetic smoke config."""

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mllmfl_dist.__main__ import main
from mllmfl_dist.config import ConfigError, load_config
from mllmfl_dist.fl.strategies import CLIP2FL

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.toml"
FAST = ["log.progress=false", "log.tensorboard=false", "creff.match_epochs=10", "creff.crt_epochs=10",
        "creff.features_per_class=20"]


def cli(*argv: str, sets=()) -> int:
    return main([*argv, *[a for s in sets for a in ("--set", s)]])


def test_creff_resumed_after_round_one_equals_a_straight_run(tmp_path, capsys):
    common = [f"run.root={tmp_path}", "federated.strategy=creff", *FAST]
    assert cli("federate", str(SMOKE), sets=[*common, "run.name=straight", "federated.rounds=2"]) == 0
    assert cli("federate", str(SMOKE), sets=[*common, "run.name=resumed", "federated.rounds=1"]) == 0
    assert cli("federate", str(SMOKE), sets=[*common, "run.name=resumed", "federated.rounds=2"]) == 0
    straight = torch.load(tmp_path / "straight" / "federated" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "federated" / "checkpoint.pt", weights_only=True)
    for key in ("features", "head"):
        a, b = straight["server_optimizer"][key], resumed["server_optimizer"][key]
        assert (a - b).abs().max().item() <= 1e-6, key
    for key, value in straight["model"].items():
        assert (value.double() - resumed["model"][key].double()).abs().max().item() <= 1e-6, key

    # The final model is the evaluated one: the FedAvg backbone with the re-trained classifier, which
    # differs from the aggregated classifier the clients' local training continues from.
    final = torch.load(tmp_path / "straight" / "federated" / "model_final.pt", weights_only=True)
    head = straight["server_optimizer"]["head"]
    assert torch.equal(final["classifier.weight"], head[:, :-1]) and torch.equal(final["classifier.bias"], head[:, -1])
    assert not torch.allclose(final["classifier.weight"], straight["model"]["classifier.weight"])
    rounds = [json.loads(line) for line in (tmp_path / "straight" / "federated" / "rounds.jsonl").open()]
    assert all(r["match_loss"] > 0 for r in rounds)

    # `evaluate` on either file reports what the run evaluated (the training checkpoint through the strategy).
    last = [json.loads(line) for line in (tmp_path / "straight" / "federated" / "metrics.jsonl").open()][-1]
    for name in ("model_final.pt", "checkpoint.pt"):
        capsys.readouterr()
        assert cli("evaluate", str(SMOKE), "--checkpoint", str(tmp_path / "straight" / "federated" / name),
                   sets=[*common, "run.name=straight"]) == 0
        assert json.loads(capsys.readouterr().out)["acc"] == pytest.approx(last["acc"]), name
    # ... and refuses a training checkpoint under another strategy (it would evaluate another classifier).
    fedavg_sets = [f"run.root={tmp_path}", "run.name=straight", *FAST]
    assert cli("evaluate", str(SMOKE), "--checkpoint", str(tmp_path / "straight" / "federated" / "checkpoint.pt"),
               sets=fedavg_sets) == 2
    assert "federated.strategy = 'creff'" in capsys.readouterr().err


def test_clip2fl_runs_the_teacher_once_per_sample_and_never_again(tmp_path, tiny_models, monkeypatch, capsys):
    import mllmfl_dist.models.clip_teacher as clip_teacher
    import mllmfl_dist.models.teachers as teachers

    seen = {"rows": 0, "loads": 0}
    real_logits, real_load = teachers.clip_teacher_logits, clip_teacher.load_clip

    def counting_logits(clip, preprocess, tokenizer, images, *args, **kwargs):
        seen["rows"] += len(images)
        return real_logits(clip, preprocess, tokenizer, images, *args, **kwargs)

    def counting_load(*args, **kwargs):
        seen["loads"] += 1
        return real_load(*args, **kwargs)

    monkeypatch.setattr(teachers, "clip_teacher_logits", counting_logits)
    monkeypatch.setattr(clip_teacher, "load_clip", counting_load)
    sets = [f"run.root={tmp_path}", "federated.strategy=clip2fl", f"clip2fl.model=local-dir:{tiny_models['clip']}",
            *FAST]
    assert cli("federate", str(SMOKE), sets=[*sets, "federated.rounds=2"]) == 0

    from mllmfl_dist.stages.federated import build_data

    data = build_data(load_config(SMOKE, sets))
    client_samples = sum(data.client_size(c) for c in range(data.num_clients))
    assert seen == {"rows": client_samples, "loads": 1}  # two rounds, each sample's logits computed once
    assert len(list((tmp_path / "smoke" / "cache").glob("clip2fl-teacher-*.pt"))) == 1

    assert cli("federate", str(SMOKE), sets=[*sets, "federated.rounds=3"]) == 0  # resumed: the cache serves
    assert seen == {"rows": client_samples, "loads": 1}

    out = tmp_path / "smoke" / "federated"
    model = torch.load(out / "model_final.pt", weights_only=True)
    assert model["projection.weight"].shape == (32, 64)  # ResNet-8 feature -> the tiny CLIP's width
    assert model["classifier.weight"].shape == (10, 32)
    last = [json.loads(line) for line in (out / "metrics.jsonl").open()][-1]
    capsys.readouterr()
    assert cli("evaluate", str(SMOKE), "--checkpoint", str(out / "model_final.pt"), sets=sets) == 0
    assert json.loads(capsys.readouterr().out)["acc"] == pytest.approx(last["acc"])


def test_clip2fl_client_loss_adds_the_distillation_term():
    cfg = load_config(SMOKE, ["federated.strategy=clip2fl", "clip2fl.model=local-dir:unused", "clip2fl.alpha=0.5"])
    strategy = CLIP2FL(cfg)
    logits, teacher = torch.randn(6, 10), torch.randn(6, 10) * 5
    labels = torch.randint(0, 10, (6,))
    t = cfg.clip2fl.temperature
    q = torch.softmax(teacher / t, dim=1)
    kl = (q * (q.log() - torch.log_softmax(logits / t, dim=1))).sum(dim=1).mean()
    expected = nn.functional.cross_entropy(logits, labels) + 0.5 * t**2 * kl
    torch.testing.assert_close(strategy.client_loss(None, logits, labels, (), teacher), expected)
    assert strategy.client_loss(None, logits, labels, (), teacher) > nn.functional.cross_entropy(logits, labels)


def test_clip2fl_needs_a_clip_model():
    with pytest.raises(ConfigError, match="clip2fl.model"):
        load_config(SMOKE, ["federated.strategy=clip2fl"])


def test_compare_writes_the_tables_and_the_plot_and_resumes_per_method(tmp_path, tiny_models, capsys):
    sets = [f"run.root={tmp_path}", "federated.rounds=2", *FAST, f"clip2fl.model=local-dir:{tiny_models['clip']}",
            "align.every=1", "align.source=holdout", "data.server_holdout_per_class=5", "align.per_class=5",
            "align.steps=5"]
    methods = "fedavg,fedprox,creff,clip2fl,mllm"
    assert cli("compare", str(SMOKE), "--strategies", methods, sets=sets) == 0
    out = tmp_path / "smoke" / "compare"
    assert "| creff | creff | 2 |" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == methods.split(",")
    assert [r["strategy"] for r in rows] == ["fedavg", "fedprox", "creff", "clip2fl", "fedavg"]
    for row in rows:
        assert row["rounds"] == "2" and 0 <= float(row["acc"]) <= 1 and float(row["wall_seconds"]) > 0
        metrics = [json.loads(line) for line in (out / row["method"] / "federated" / "metrics.jsonl").open()]
        assert float(row["acc"]) == pytest.approx(metrics[-1]["acc"])
    sent = {r["method"]: int(r["bytes_all_reduced_per_round"]) for r in rows}
    assert sent["creff"] > sent["fedavg"] == sent["fedprox"] == sent["mllm"]  # the class gradients travel too
    markdown = (out / "results.md").read_text()
    assert markdown.count("\n| ") == len(rows) and "| mllm | fedavg | 2 |" in markdown
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Only mllm aligned: the baselines run with alignment off.
    assert "before_align" in (out / "mllm" / "federated" / "metrics.jsonl").read_text()
    assert "before_align" not in (out / "fedavg" / "federated" / "metrics.jsonl").read_text()

    # A rerun with one more method trains only that one; the finished ones are left as they are.
    before = {m: (out / m / "federated" / "rounds.jsonl").read_text() for m in methods.split(",")}
    assert cli("compare", str(SMOKE), "--strategies", methods + ",fedavgm", sets=sets) == 0
    assert all((out / m / "federated" / "rounds.jsonl").read_text() == text for m, text in before.items())
    assert [r["method"] for r in csv.DictReader((out / "results.csv").open())][-1] == "fedavgm"


def test_compare_refuses_bad_methods_before_running_anything(tmp_path, capsys):
    sets = [f"run.root={tmp_path}"]
    assert cli("compare", str(SMOKE), "--strategies", "fedavg,fedsgd", sets=sets) == 2
    assert "fedsgd" in capsys.readouterr().err
    assert cli("compare", str(SMOKE), "--strategies", "fedavg,mllm", sets=sets) == 2  # smoke aligns nothing
    assert "align.every" in capsys.readouterr().err
    assert cli("compare", str(SMOKE), "--strategies", "clip2fl", sets=sets) == 2
    assert "clip2fl.model" in capsys.readouterr().err
    missing = tmp_path / "no_clip"
    assert cli("compare", str(SMOKE), "--strategies", "fedavg,clip2fl", sets=[*sets, f"clip2fl.model=local-dir:{missing}"]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "smoke").exists()


def test_a_payload_too_large_for_the_all_reduce_is_refused():
    from mllmfl_dist.stages.federated import MAX_PAYLOAD_BYTES, check_payload_size

    cfg = load_config(SMOKE, ["federated.strategy=creff"])
    check_payload_size(cfg, MAX_PAYLOAD_BYTES // 8)
    with pytest.raises(ConfigError, match="classes\\^2"):
        check_payload_size(cfg, 1000 * 1000 * 2049 + 1000)  # ImageNet-LT classes, ResNet-50 features
