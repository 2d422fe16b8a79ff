"""The linear probe (``python -m mllmfl_dist probe``, :mod:`mllmfl_dist.fl.probe`): a trained backbone's
features separate the classes better than a random initialisation's, on a stated recipe and labelled set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mllmfl_dist.__main__ import main
from mllmfl_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.toml")
# configs/smoke.toml's own task (10 classes, 16x16 RGB) is separable by any network: a random ResNet-8
# probes at 1.000 there, like a trained one. One-channel 8x8 images of 100 classes leave the class mostly in
# the coarse spatial pattern, which random pooled features keep only in part (measured: random init 0.849,
# 25 SGD steps 0.993).
HARD = [
    "data.channels=1",
    "data.image_size=8",
    "data.num_classes=100",
    "data.samples_per_class=30",
    "data.imb_factor=1.0",
    "data.test_per_class=10",
    "data.server_holdout_per_class=5",
    "data.random_crop=false",
]
MARGIN = 0.05  # balanced-accuracy points the trained backbone must gain over the random init


def train_a_few_steps(cfg, steps: int = 25):
    """The run's initial ResNet-8 after ``steps`` SGD steps (batch 64, lr 0.05, momentum 0.9) on the clients'
    images (the server holdout is disjoint from them)."""
    from mllmfl_dist.data import normalize
    from mllmfl_dist.stages.inputs import build_data, build_fl_model

    data = build_data(cfg)
    parts = [data.client(c) for c in range(data.num_clients)]
    images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    model = build_fl_model(cfg.model, data, cfg.run.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(normalize(images[idx], data.mean, data.std)), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def test_the_probe_separates_a_trained_backbone_from_a_random_one(tmp_path, capsys):
    overrides = [*HARD, f"run.root={tmp_path}"]
    cfg = load_config(SMOKE, overrides)
    final = tmp_path / "model_final.pt"
    torch.save(train_a_few_steps(cfg).state_dict(), final)
    out = tmp_path / "table" / "probe.json"
    sets = [a for o in overrides for a in ("--set", o)]
    assert main(["probe", SMOKE, *sets, "--backbone", str(final), "--backbone", "random:0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"| {final} | model, 64-d |" in printed and "| random:0 | random init (seed 0), 64-d |" in printed
    report = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text() in printed
    trained, random = report["rows"]
    print(f"probe, balanced test accuracy: trained {trained['acc']:.3f}, random init {random['acc']:.3f}")
    assert trained["acc"] >= random["acc"] + MARGIN
    assert report["train_set"] == "server holdout (500 images)" and trained["n_train"] == 500
    assert trained["n_test"] == 1000 and report["test_set"] == "balanced test set (1000 images)"
    assert all(row["converged"] and row["feature_dim"] == 64 for row in report["rows"])


def test_a_bad_spec_is_one_line_and_exit_2(tmp_path, capsys):
    sets = ["--set", "data.server_holdout_per_class=2", "--set", f"run.root={tmp_path}"]
    for spec, words in [
        (str(tmp_path / "missing.pt"), "no such file"),
        ("random:x", "random:SEED needs"),
        (str(REPO / "README.md"), "--backbone"),
    ]:
        assert main(["probe", SMOKE, *sets, "--backbone", "random:0", "--backbone", spec]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "smoke" / "probe").exists()  # nothing probed before every SPEC was checked


def test_a_backbone_of_another_model_is_refused(tmp_path, capsys):
    from mllmfl_dist.fl.models import build_model

    wide = tmp_path / "backbone.pt"
    torch.save(build_model("resnet8", 3, 10, width_scale=2).backbone_state_dict(), wide)
    code = main(["probe", SMOKE, "--set", "data.server_holdout_per_class=2", "--backbone", str(wide)])
    err = capsys.readouterr().err
    assert code == 2 and "does not fit the config's model (resnet8, width_scale 1)" in err


def test_without_a_holdout_the_probe_names_the_key(capsys):
    assert main(["probe", SMOKE, "--backbone", "random:0"]) == 2
    assert "data.server_holdout_per_class > 0" in capsys.readouterr().err


@pytest.mark.parametrize("per_class", [1, 3])
def test_the_capped_test_set_keeps_the_first_images_of_each_class(per_class):
    from mllmfl_dist.fl.probe import first_per_class

    labels = torch.tensor([2, 0, 2, 1, 0, 2, 0, 1])
    images = torch.arange(8).view(8, 1, 1, 1).to(torch.uint8)
    kept_images, kept = first_per_class(images, labels, per_class)
    expected = [i for i in range(8) if int((labels[:i] == labels[i]).sum()) < per_class]
    assert kept_images.flatten().tolist() == expected and kept.tolist() == labels[expected].tolist()


def test_a_validation_split_is_scored_when_the_data_has_one():
    """``ClientData.val_set()`` (data.val_per_class) is used where the data has it; here it is pointed at the
    test set, so the two scores must agree."""
    from mllmfl_dist.commands.probe import probe_markdown
    from mllmfl_dist.fl.probe import linear_probe, pooled_features, probe_sets
    from mllmfl_dist.stages.inputs import build_data, build_fl_model

    cfg = load_config(SMOKE, ["data.server_holdout_per_class=5", "data.test_per_class=10"])
    data = build_data(cfg)
    assert probe_sets(data).val is None or not len(probe_sets(data).val[1])
    data.val_set = data.test_set
    sets = probe_sets(data)
    model = build_fl_model(cfg.model, data, 0)
    result = linear_probe(lambda images: pooled_features(model, images, data.mean, data.std), sets)
    assert result["val_acc"] == result["acc"] and result["val_acc_top1"] == result["acc_top1"]
    table = probe_markdown(
        {
            "train_set": sets.train_name,
            "test_set": "t",
            "val_set": "v",
            "recipe": "r",
            "rows": [{"backbone": "random:0", "kind": "random init", **result}],
        }
    )
    assert "| val acc |" in table and f"| {result['val_acc']:.4f} |" in table


def test_the_clip_image_tower_is_probed_and_a_missing_one_is_one_line(tiny_models, tmp_path, capsys):
    from mllmfl_dist.mllm.clip_teacher import clip_embed_dim

    spec = f"clip:local-dir:{tiny_models['clip']}"
    sets = [
        "--set",
        "data.server_holdout_per_class=3",
        "--set",
        "data.test_per_class=5",
        "--set",
        f"run.root={tmp_path}",
    ]
    assert main(["probe", SMOKE, *sets, "--backbone", spec]) == 0
    (row,) = json.loads((tmp_path / "smoke" / "probe" / "probe.json").read_text())["rows"]
    assert row["kind"] == "clip image tower" and row["feature_dim"] == clip_embed_dim(spec[len("clip:") :])
    assert row["n_train"] == 30 and row["n_test"] == 50 and 0.0 <= row["acc"] <= 1.0
    capsys.readouterr()
    assert main(["probe", SMOKE, *sets, "--backbone", f"clip:local-dir:{tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "local directory not found" in err


def test_over_seeds_each_seed_template_is_probed_per_seed_and_summarised(tmp_path, capsys):
    sets = [
        a
        for o in ("data.server_holdout_per_class=5", "data.test_per_class=10", f"run.root={tmp_path}")
        for a in ("--set", o)
    ]
    out = tmp_path / "probe.json"
    assert (
        main(
            [
                "probe",
                SMOKE,
                *sets,
                "--seeds",
                "3,1,4",
                "--backbone",
                "random:{seed}",
                "--backbone",
                "random:9",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert [row["backbone"] for row in report["rows"]] == ["random:3", "random:1", "random:4", "random:9"]
    (entry,) = report["over_seeds"]
    assert entry["template"] == "random:{seed}" and entry["seeds"] == [3, 1, 4]
    accs = [row["acc"] for row in report["rows"][:3]]
    mean = sum(accs) / 3
    sd = (sum((a - mean) ** 2 for a in accs) / 2) ** 0.5
    assert entry["acc"]["mean"] == pytest.approx(mean) and entry["acc"]["sd"] == pytest.approx(sd)
    assert entry["acc"]["ci95"] == pytest.approx(4.302653 * sd / 3**0.5, rel=1e-5)  # t_{0.975, 2}
    assert "| random:{seed} | 3 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, words",
    [
        (["--backbone", "random:{seed}"], "give --seeds"),
        (["--seeds", "0,1", "--backbone", "random:0"], "no --backbone holds {seed}"),
        (["--seeds", "0,0", "--backbone", "random:{seed}"], "distinct"),
    ],
)
def test_seeds_without_a_template_or_a_template_without_seeds_is_one_line(args, words, capsys):
    assert main(["probe", SMOKE, "--set", "data.server_holdout_per_class=2", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
