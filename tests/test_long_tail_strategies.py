"""CReFF and CLIP2FL through the CLI in-process, on the synthetic smoke config."""

import json

import pytest
import torch
from torch import nn

from launchers import FAST, SMOKE, cli

from mllmfl_dist.config import ConfigError, load_config
from mllmfl_dist.fl.strategies import build_strategy


def test_creff_resumed_after_round_one_equals_a_straight_run(tmp_path, capsys):
    common = [f"run.root={tmp_path}", "federated.strategy=creff", *FAST]
    assert cli("federate", str(SMOKE), sets=[*common, "run.name=straight", "federated.rounds=2"]) == 0
    assert cli("federate", str(SMOKE), sets=[*common, "run.name=resumed", "federated.rounds=1"]) == 0
    assert cli("federate", str(SMOKE), sets=[*common, "run.name=resumed", "federated.rounds=2"]) == 0
    straight = torch.load(tmp_path / "straight" / "federated" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "federated" / "checkpoint.pt", weights_only=True)
    for key in ("features", "head"):
        a, b = straight["strategy"][key], resumed["strategy"][key]
        assert (a - b).abs().max().item() <= 1e-6, key
    for key, value in straight["model"].items():
        assert (value.double() - resumed["model"][key].double()).abs().max().item() <= 1e-6, key

    # The final model is the evaluated one: the FedAvg backbone with the re-trained classifier, which
    # differs from the aggregated classifier the clients' local training continues from.
    final = torch.load(tmp_path / "straight" / "federated" / "model_final.pt", weights_only=True)
    head = straight["strategy"]["head"]
    assert torch.equal(final["classifier.weight"], head[:, :-1]) and torch.equal(final["classifier.bias"], head[:, -1])
    assert not torch.allclose(final["classifier.weight"], straight["model"]["classifier.weight"])
    rounds = [json.loads(line) for line in (tmp_path / "straight" / "federated" / "rounds.jsonl").open()]
    assert all(r["match_loss"] > 0 for r in rounds)

    # `evaluate` on either file reports what the run evaluated (the training checkpoint through the strategy).
    last = [json.loads(line) for line in (tmp_path / "straight" / "federated" / "metrics.jsonl").open()][-1]
    for name in ("model_final.pt", "checkpoint.pt"):
        capsys.readouterr()
        assert (
            cli(
                "evaluate",
                str(SMOKE),
                "--checkpoint",
                str(tmp_path / "straight" / "federated" / name),
                sets=[*common, "run.name=straight"],
            )
            == 0
        )
        assert json.loads(capsys.readouterr().out)["acc"] == pytest.approx(last["acc"]), name
    # ... and refuses a training checkpoint under another strategy (it would evaluate another classifier).
    fedavg_sets = [f"run.root={tmp_path}", "run.name=straight", *FAST]
    assert (
        cli(
            "evaluate",
            str(SMOKE),
            "--checkpoint",
            str(tmp_path / "straight" / "federated" / "checkpoint.pt"),
            sets=fedavg_sets,
        )
        == 2
    )
    assert "federated.strategy = 'creff'" in capsys.readouterr().err


def test_clip2fl_runs_the_teacher_once_per_sample_and_never_again(tmp_path, tiny_models, monkeypatch, capsys):
    import mllmfl_dist.mllm.clip_teacher as clip_teacher
    import mllmfl_dist.mllm.teachers as teachers

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
    sets = [
        f"run.root={tmp_path}",
        "federated.strategy=clip2fl",
        f"clip2fl.model=local-dir:{tiny_models['clip']}",
        *FAST,
    ]
    assert cli("federate", str(SMOKE), sets=[*sets, "federated.rounds=2"]) == 0

    from mllmfl_dist.stages.inputs import build_data

    data = build_data(load_config(SMOKE, sets))
    client_samples = sum(data.client_size(c) for c in range(data.num_clients))
    assert seen == {"rows": client_samples, "loads": 1}  # two rounds, each sample's logits computed once
    assert len(list((tmp_path / "smoke" / "cache").glob("clip2fl-teacher-*.pt"))) == 1

    assert cli("federate", str(SMOKE), sets=[*sets, "federated.rounds=3"]) == 0  # resumed: the cache serves
    assert seen == {"rows": client_samples, "loads": 1}

    out = tmp_path / "smoke" / "federated"
    model = torch.load(out / "model_final.pt", weights_only=True)
    # ResNet-8's 64-wide feature -> twice that, as released (the tiny CLIP's text width, 32, differs: the
    # server's contrast ran through the seeded text projection, and the rounds matched features)
    assert model["projection.weight"].shape == (128, 64)
    assert model["classifier.weight"].shape == (10, 128)
    assert all(r["match_loss"] > 0 for r in map(json.loads, (out / "rounds.jsonl").open()))
    # The teacher ran at the tiny CLIP's own learned scale, and the summary says how good and sure it was (also
    # after a rerun of the complete run, which runs no teacher pass).
    assert cli("federate", str(SMOKE), sets=[*sets, "federated.rounds=3"]) == 0
    from mllmfl_dist.mllm.clip_teacher import load_clip

    own = float(load_clip(f"local-dir:{tiny_models['clip']}")[0].logit_scale.detach().exp())
    teacher = json.loads((out / "summary.json").read_text())["clip2fl_teacher"]
    assert teacher["logit_scale"] == pytest.approx(own) and teacher["samples"] == client_samples
    assert 0 <= teacher["accuracy"] <= 1 and 0 < teacher["mean_entropy_nats"] <= teacher["max_entropy_nats"]
    last = [json.loads(line) for line in (out / "metrics.jsonl").open()][-1]
    capsys.readouterr()
    assert cli("evaluate", str(SMOKE), "--checkpoint", str(out / "model_final.pt"), sets=sets) == 0
    assert json.loads(capsys.readouterr().out)["acc"] == pytest.approx(last["acc"])


def test_clip2fl_local_loss_adds_the_distillation_term():
    cfg = load_config(SMOKE, ["federated.strategy=clip2fl", "clip2fl.model=local-dir:unused", "clip2fl.alpha=0.5"])
    strategy = build_strategy(cfg)
    logits, teacher = torch.randn(6, 10), torch.randn(6, 10) * 5
    labels = torch.randint(0, 10, (6,))
    t = cfg.section("clip2fl").temperature
    q = torch.softmax(teacher / t, dim=1)
    kl = (q * (q.log() - torch.log_softmax(logits / t, dim=1))).sum(dim=1).mean()
    expected = nn.functional.cross_entropy(logits, labels) + 0.5 * t**2 * kl
    torch.testing.assert_close(strategy.local_loss(None, logits, labels, (), teacher), expected)
    assert strategy.local_loss(None, logits, labels, (), teacher) > nn.functional.cross_entropy(logits, labels)


def test_clip2fl_needs_a_clip_model():
    with pytest.raises(ConfigError, match="clip2fl.model"):
        load_config(SMOKE, ["federated.strategy=clip2fl"])


def test_uploads_too_large_for_the_all_reduce_are_refused_naming_their_tensors():
    from mllmfl_dist.fl.aggregation import FlatLayout
    from mllmfl_dist.fl.round_buffers import MAX_UPLOAD_BYTES, check_upload_size

    check_upload_size("creff", FlatLayout.of_shapes({"class_gradients": (MAX_UPLOAD_BYTES // 8,)}))
    # ImageNet-LT classes, ResNet-50 features: CReFF's upload_shapes
    shapes = {"class_gradients": (1000, 1000, 2049), "class_weights": (1000,)}
    named = "class_gradients 1000 x 1000 x 2049 float64, class_weights 1000 float64"
    with pytest.raises(ConfigError, match=f"15.3 GiB .*{named}"):
        check_upload_size("creff", FlatLayout.of_shapes(shapes))
