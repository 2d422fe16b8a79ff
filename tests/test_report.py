"""The report stage: summary.json from hand-written stage outputs, and valid PNG plots."""

import json
import logging

import pytest

from mllmfl_dist.stages.report import write_report

PNG_SIG = b"\x89PNG\r\n\x1a\n"
PLOTS = ("accuracy.png", "per_class.png", "groups.png")


def _rec(rnd, acc, many, medium, few, per_class, before=None, align_loss=None):
    r = {
        "round": rnd,
        "acc": acc,
        "per_class": per_class,
        "acc_many": many,
        "acc_medium": medium,
        "acc_few": few,
        "round_seconds": 0.5,
        "bytes_all_reduced": 1000,
    }
    if before is not None:
        r["before_align"] = before
        r["align_loss"] = align_loss
    return r


def _write_federated(run, records, torn_tail=False, summary=True):
    fed = run / "federated"
    fed.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    if torn_tail:
        text += '{"round": 99, "acc": 0.'
    (fed / "metrics.jsonl").write_text(text)
    if summary:
        (fed / "summary.json").write_text(
            json.dumps({"rounds": records[-1]["round"], "final": records[-1], "world_size": 3, "backend": "gloo"})
        )


def _assert_pngs(report):
    for name in PLOTS:
        data = (report / name).read_bytes()
        assert data[:8] == PNG_SIG, name
        assert len(data) > 2000, name
    assert not [p for p in report.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.fixture
def full_run(tmp_path):
    run = tmp_path / "run"
    (run / "annotate").mkdir(parents=True)
    (run / "annotate" / "manifest.json").write_text(
        json.dumps(
            {
                "model": "m",
                "images_in": 512,
                "captions_out": 509,
                "skipped": [
                    {"shard": "a.tar", "key": "k1", "reason": "corrupt"},
                    {"shard": "a.tar", "key": "k2", "reason": "corrupt"},
                    {"shard": "b.tar", "key": "k3", "reason": "corrupt"},
                ],
                "damaged_shards": [{"shard": "c.tar", "error": "truncated"}],
                "seconds": 1.5,
                "images_per_second": 343.9,
            }
        )
    )
    (run / "pretrain").mkdir()
    (run / "pretrain" / "metrics.json").write_text(
        json.dumps(
            {
                "loss": [{"step": 1, "loss": 7.0, "alpha": 0.0}, {"step": 2, "loss": 6.0, "alpha": 1.0}],
                "heldout_loss_alpha1_step0": 11.14,
                "heldout_loss_alpha1": 6.24,
                "heldout_loss_alpha0": 6.39,
                "samples_per_second": 200.8,
                "steps": 60,
                "world_size": 3,
            }
        )
    )
    pc = [0.1 * i for i in range(10)]
    records = [
        _rec(2, 0.10, 0.30, 0.0, None, pc),  # an early evaluation without alignment
        _rec(
            4,
            0.25,
            0.50,
            0.2,
            0.05,
            pc,
            before={"acc": 0.15, "acc_many": 0.4, "acc_medium": 0.1, "acc_few": 0.0, "per_class": pc},
            align_loss=2.2,
        ),
        _rec(
            6,
            0.45,
            0.33,
            0.58,
            0.45,
            pc[::-1],
            before={"acc": 0.13, "acc_many": 0.33, "acc_medium": 0.08, "acc_few": 0.005, "per_class": pc},
            align_loss=1.9,
        ),
    ]
    _write_federated(run, records, torn_tail=True)
    return run


def test_full_run(full_run):
    s = write_report(full_run)
    report = full_run / "report"
    assert json.loads((report / "summary.json").read_text()) == s

    assert s["annotate"] == {
        "images_in": 512,
        "captions_out": 509,
        "skipped": 3,
        "damaged_shards": 1,
        "images_per_second": 343.9,
    }
    assert s["pretrain"] == {
        "heldout_loss_alpha1_step0": 11.14,
        "heldout_loss_alpha1": 6.24,
        "heldout_loss_alpha0": 6.39,
        "samples_per_second": 200.8,
        "steps": 60,
    }
    fed = s["federated"]
    assert fed["round"] == 6  # the torn last line is dropped
    assert (fed["acc"], fed["acc_many"], fed["acc_medium"], fed["acc_few"]) == (0.45, 0.33, 0.58, 0.45)
    assert fed["per_class"] == [0.1 * i for i in range(10)][::-1]
    ba = fed["before_align"]
    assert (ba["acc"], ba["acc_many"], ba["acc_medium"], ba["acc_few"]) == (0.13, 0.33, 0.08, 0.005)
    assert fed["align_loss"] == 1.9
    assert fed["rounds"] == 6 and fed["world_size"] == 3
    assert s["plots"] == list(PLOTS)
    _assert_pngs(report)

    # rerunning replaces the report in place
    assert write_report(full_run) == s
    _assert_pngs(report)


def test_federated_only_without_alignment(tmp_path):
    run = tmp_path / "run"
    pc = [1.0, 0.5, 0.0]
    _write_federated(
        run,
        [_rec(1, 0.2, 0.4, None, None, pc), _rec(2, 0.3, 0.5, None, 0.1, pc), _rec(3, 0.5, 0.6, None, 0.2, pc)],
        summary=False,
    )
    s = write_report(run)
    assert "annotate" not in s and "pretrain" not in s
    fed = s["federated"]
    assert fed["round"] == 3 and fed["acc"] == 0.5 and fed["acc_medium"] is None
    assert "before_align" not in fed and "rounds" not in fed
    assert json.loads((run / "report" / "summary.json").read_text()) == s
    _assert_pngs(run / "report")


def test_no_metrics_writes_summary_without_plots(tmp_path, caplog):
    run = tmp_path / "run"
    (run / "pretrain").mkdir(parents=True)
    (run / "pretrain" / "metrics.json").write_text(json.dumps({"heldout_loss_alpha1": 5.0, "steps": 3}))
    with caplog.at_level(logging.WARNING):
        s = write_report(run)
    assert "no federated metrics" in caplog.text
    assert "federated" not in s and "annotate" not in s
    assert s["pretrain"]["heldout_loss_alpha1"] == 5.0 and s["pretrain"]["steps"] == 3
    assert s["plots"] == []
    report = run / "report"
    assert json.loads((report / "summary.json").read_text()) == s
    assert not any((report / n).exists() for n in PLOTS)

    empty = tmp_path / "empty"
    empty.mkdir()
    s = write_report(empty)
    assert set(s) == {"run_dir", "plots"}
    assert (empty / "report" / "summary.json").is_file()


def test_the_report_sets_the_method_beside_its_baseline_chance_and_the_models_it_used(full_run, tmp_path, capsys):
    from mllmfl_dist.__main__ import main

    pc = [0.1 * i for i in range(10)]
    _write_federated(full_run / "baseline", [_rec(2, 0.05, 0.1, 0.0, None, pc), _rec(6, 0.2, 0.3, 0.0, 0.0, pc)])
    names = [f"class-{c}" for c in range(10)]
    summary = json.loads((full_run / "federated" / "summary.json").read_text())
    summary["class_names"] = names
    trained, random_build = tmp_path / "standins" / "llava", tmp_path / "tiny" / "clip"
    # What the federated stage records of the models its strategy named (CLIP2FL's CLIP).
    summary["strategy_models"] = [
        {
            "role": "CLIP2FL's CLIP",
            "key": "clip2fl.model",
            "model": f"local-dir:{random_build}",
            "pretrained": "",
            "kind": "clip",
        }
    ]
    (full_run / "federated" / "summary.json").write_text(json.dumps(summary))
    (full_run / "federated" / "partition.json").write_text(json.dumps({"class_counts": [[5, 0, 3] + [1] * 7] * 4}))
    trained.mkdir(parents=True)
    (trained.parent / "tiny_models.json").write_text(json.dumps({"trained": True}))
    (trained.parent / "model_card.json").write_text(json.dumps({"measured": {"llava_teacher_acc": 0.71}}))
    random_build.mkdir(parents=True)
    (random_build.parent / "tiny_models.json").write_text(json.dumps({"trained": False}))
    (full_run / "config.toml").write_text(
        f'[model]\npretrained_backbone = "pretrain"\n[annotate]\nmodel = "{trained}"\n[pretrain]\nshards = ""\n'
        f'[align]\nevery = 1\nteacher = "llava"\nteacher_model = "{trained}"\n'
        f'[federated]\nstrategy = "clip2fl"\n[clip2fl]\nmodel = "local-dir:{random_build}"\n'
    )

    assert main(["report", str(full_run)]) == 0
    assert "report.md" in capsys.readouterr().out
    s = json.loads((full_run / "report" / "summary.json").read_text())
    assert s["baseline"]["acc"] == 0.2 and s["federated"]["chance"] == 0.1
    assert s["plots"] == ["accuracy.png", "per_class.png", "groups.png", "partition.png"]
    roles = {m["role"]: m for m in s["models"]}
    assert roles["DWP LLaVA"]["kind"] == "trained here" and roles["DWP LLaVA"]["card"]["llava_teacher_acc"] == 0.71
    assert roles["CLIP2FL's CLIP"]["kind"] == "tiny random (no knowledge)"
    assert set(roles) == {"annotation LLaVA", "DWP LLaVA", "alignment teacher (llava)", "CLIP2FL's CLIP"}
    markdown = (full_run / "report" / "report.md").read_text()
    assert "| FedAvg from scratch, round 6 | 0.200 |" in markdown and "| chance | 0.100 |" in markdown
    assert "![accuracy](accuracy.png)" in markdown and "tiny random (no knowledge)" in markdown
    assert "llava_teacher_acc 0.710" in markdown
    _assert_pngs(full_run / "report")

    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "holds no run" in capsys.readouterr().err


def test_the_report_reads_a_strategys_models_from_the_config_of_a_run_older_than_strategy_models():
    from mllmfl_dist.stages.report import _strategy_models

    config = {"federated": {"strategy": "clip2fl"}, "clip2fl": {"model": "local-dir:/somewhere/clip"}}
    assert _strategy_models(config) == [
        {
            "role": "CLIP2FL's CLIP",
            "key": "clip2fl.model",
            "model": "local-dir:/somewhere/clip",
            "pretrained": "",
            "kind": "clip",
        }
    ]
    assert _strategy_models({"federated": {"strategy": "fedavg"}}) == []
    assert _strategy_models({"federated": {"strategy": "no_such_strategy"}}) == []  # warned, not raised
    assert _strategy_models({"federated": {"strategy": "creff"}, "creff": {"no_such_key": 1}}) == []
