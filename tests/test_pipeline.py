"""``run``: every stage in one job on the tiny models; a rerun redoes nothing that is finished."""

import json
from pathlib import Path

from mllmfl_dist.__main__ import main
from mllmfl_dist.commands.pipeline import baseline_config, planned_stages
from mllmfl_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "configs" / "default.toml"


def test_planned_stages_follow_from_the_config():
    assert planned_stages(load_config(DEFAULT)) == ["annotate", "pretrain", "federate", "baseline", "report"]
    assert planned_stages(load_config(DEFAULT, ["pretrain.shards=x/*.tar", "run.baseline=false"])) == [
        "pretrain",
        "federate",
        "report",
    ]
    assert planned_stages(load_config(DEFAULT, ["model.pretrained_backbone="])) == ["federate", "baseline", "report"]
    plain = ["model.pretrained_backbone=", "align.every=0"]  # no stage of the method: nothing to compare with
    assert planned_stages(load_config(DEFAULT, plain)) == ["federate", "report"]


def test_the_baseline_is_fedavg_from_scratch_on_the_same_data_and_seed():
    cfg = load_config(DEFAULT, ["federated.strategy=fedprox", "run.seed=3"])
    base = baseline_config(cfg)
    assert (base.federated.strategy, base.model.pretrained_backbone, base.align.every) == ("fedavg", "", 0)
    assert base.run_dir == cfg.run_dir / "baseline" and base.run.seed == 3 and base.data == cfg.data
    assert base.partition == cfg.partition and base.federated.rounds == cfg.federated.rounds


def test_run_finishes_on_the_tiny_models_and_a_rerun_redoes_nothing(tmp_path, tiny_models, capsys):
    sets = [
        f"run.root={tmp_path}",
        f"annotate.model={tiny_models['llava']}",
        "annotate.shards=shards/pool/pool-000000.tar.gz",
        "annotate.max_new_tokens=8",
        "pretrain.steps=6",
        "pretrain.heldout=8",
        "pretrain.checkpoint_every=3",
        "federated.rounds=2",
        "eval.every=1",
        f"align.teacher_model={tiny_models['llava']}",
        "align.steps=3",
        "log.progress=false",
    ]
    argv = ["run", str(DEFAULT), *[a for s in sets for a in ("--set", s)]]
    assert main(argv) == 0
    run_dir = tmp_path / "default"
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    assert summary["annotate"]["captions_out"] == 128
    assert summary["pretrain"]["heldout_loss_alpha1"] > 0
    assert summary["federated"]["round"] == 2 and "before_align" in summary["federated"]
    baseline = [json.loads(line) for line in (run_dir / "baseline" / "federated" / "metrics.jsonl").open()]
    assert [r["round"] for r in baseline] == [1, 2] and not any("before_align" in r for r in baseline)
    for plot in ("accuracy.png", "per_class.png", "groups.png"):
        assert (run_dir / "report" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run_dir / "align").glob("teacher-llava-*.pt")), "teacher distributions cached"

    watched = [
        run_dir / "annotate" / "pool-000000.tar.gz",
        run_dir / "pretrain" / "backbone.pt",
        run_dir / "federated" / "checkpoint.pt",
        run_dir / "baseline" / "federated" / "checkpoint.pt",
    ]
    stamps = [p.stat().st_mtime_ns for p in watched]
    rounds = (run_dir / "federated" / "rounds.jsonl").read_text()
    assert main(argv) == 0
    assert [p.stat().st_mtime_ns for p in watched] == stamps
    assert (run_dir / "federated" / "rounds.jsonl").read_text() == rounds
