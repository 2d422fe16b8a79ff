"""The report stage: summary.json from hand-written stage outputs, and valid PNG plots."""

import json
import logging

import pytest

from mllmfl_dist.stages.report import write_report

PNG_SIG = b"\x89PNG\r\n\x1a\n"
PLOTS = ("accuracy.png", "per_class.png", "groups.png")


def _rec(rnd, acc, many, medium, few, per_class, before=None, align_loss=None):
    r = {"round": rnd, "acc": acc, "per_class": per_class, "acc_many": many, "acc_medium": medium,
         "acc_few": few, "round_seconds": 0.5, "bytes_all_reduced": 1000}
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
        (fed / "summary.json").write_text(json.dumps(
            {"rounds": records[-1]["round"], "final": records[-1], "world_size": 3, "backend": "gloo"}))


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
    (run / "annotate" / "manifest.json").write_text(json.dumps({
        "model": "m", "images_in": 512, "captions_out": 509,
        "skipped": [{"shard": "a.tar", "key": "k1", "reason": "corrupt"},
                    {"shard": "a.tar", "key": "k2", "reason": "corrupt"},
                    {"shard": "b.tar", "key": "k3", "reason": "corrupt"}],
        "damaged_shards": [{"shard": "c.tar", "error": "truncated"}],
        "seconds": 1.5, "images_per_second": 343.9}))
    (run / "pretrain").mkdir()
    (run / "pretrain" / "metrics.json").write_text(json.dumps({
        "loss": [{"step": 1, "loss": 7.0, "alpha": 0.0}, {"step": 2, "loss": 6.0, "alpha": 1.0}],
        "heldout_loss_alpha1_step0": 11.14, "heldout_loss_alpha1": 6.24, "heldout_loss_alpha0": 6.39,
        "samples_per_second": 200.8, "steps": 60, "world_size": 3}))
    pc = [0.1 * i for i in range(10)]
    records = [
        _rec(2, 0.10, 0.30, 0.0, None, pc),  # an early evaluation without alignment
        _rec(4, 0.25, 0.50, 0.2, 0.05, pc,
             before={"acc": 0.15, "acc_many": 0.4, "acc_medium": 0.1, "acc_few": 0.0, "per_class": pc},
             align_loss=2.2),
        _rec(6, 0.45, 0.33, 0.58, 0.45, pc[::-1],
             before={"acc": 0.13, "acc_many": 0.33, "acc_medium": 0.08, "acc_few": 0.005,
                     "per_class": pc},
             align_loss=1.9),
    ]
    _write_federated(run, records, torn_tail=True)
    return run


def test_full_run(full_run):
    s = write_report(full_run)
    report = full_run / "report"
    assert json.loads((report / "summary.json").read_text()) == s

    assert s["annotate"] == {"images_in": 512, "captions_out": 509, "skipped": 3, "damaged_shards": 1,
                             "images_per_second": 343.9}
    assert s["pretrain"] == {"heldout_loss_alpha1_step0": 11.14, "heldout_loss_alpha1": 6.24,
                             "heldout_loss_alpha0": 6.39, "samples_per_second": 200.8, "steps": 60}
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
    _write_federated(run, [_rec(1, 0.2, 0.4, None, None, pc), _rec(2, 0.3, 0.5, None, 0.1, pc),
                           _rec(3, 0.5, 0.6, None, 0.2, pc)], summary=False)
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
