"""The stage protocol: each stage's status on a fresh, a partial and a complete run directory, read from the
markers it has always written; ``run`` skips complete stages and a rerun rewrites only the report."""

import json
import logging
from pathlib import Path

import numpy as np

from mllmfl_dist.__main__ import main
from mllmfl_dist.commands.pipeline import baseline_config, plan
from mllmfl_dist.config import DistConfig, load_config
from mllmfl_dist.core import checkpoint, dist
from mllmfl_dist.data.shards import write_shards
from mllmfl_dist.stages.annotate import AnnotateStage, run_annotate
from mllmfl_dist.stages.federated_status import FederateStage
from mllmfl_dist.stages.pretrain.recipe import PretrainStage
from mllmfl_dist.stages.report import ReportStage

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.toml"
DEFAULT = REPO / "configs" / "default.toml"
QUIET = ["log.progress=false"]


def sets(*keys: str) -> list[str]:
    return [a for k in keys for a in ("--set", k)]


def test_the_plan_is_stage_objects_named_as_before():
    stages = plan(load_config(DEFAULT))
    assert [type(s) for s in stages] == [AnnotateStage, PretrainStage, FederateStage, FederateStage, ReportStage]
    assert [s.name for s in stages] == ["annotate", "pretrain", "federate", "baseline", "report"]


def test_annotate_status_fresh_partial_complete(tmp_path, tiny_models):
    rng = np.random.default_rng(0)
    write_shards(
        [{"key": f"img{i:04d}", "image": rng.integers(0, 256, (3, 24, 24), dtype=np.uint8)} for i in range(6)],
        str(tmp_path / "web"),
        max_count=3,
    )
    keys = [
        f"run.root={tmp_path / 'runs'}",
        f"annotate.model={tiny_models['llava']}",
        "annotate.max_new_tokens=4",
        "annotate.batch_size=3",
        *QUIET,
    ]
    cfg = load_config(DEFAULT, [*keys, f"annotate.shards={tmp_path}/web-*.tar.gz"])
    first = load_config(DEFAULT, [*keys, f"annotate.shards={tmp_path}/web-000000.tar.gz"])
    stage, runtime = AnnotateStage(), dist.init_runtime(DistConfig(threads=1), env={})
    assert stage.status(cfg).state == "fresh"
    run_annotate(first, runtime, progress=False)  # one of the two shards
    partial = stage.status(cfg)
    assert partial.state == "resume" and "1 of 2 shards" in partial.detail
    assert stage.status(first).complete
    run_annotate(cfg, runtime, progress=False)
    assert stage.status(cfg).complete and all(p.is_file() for p in stage.outputs(cfg))
    # the same records under other generation settings: not complete (annotate refuses them when it runs)
    assert (
        stage.status(
            load_config(DEFAULT, [*keys, f"annotate.shards={tmp_path}/web-*.tar.gz", "annotate.max_new_tokens=5"])
        ).state
        == "resume"
    )
    (cfg.paths.annotate / "manifest.json").unlink()  # written last: without it the stage is not complete
    assert stage.status(cfg).state == "resume"


def test_pretrain_status_reads_the_digests_and_deepspeed_tags(tmp_path):
    cfg = load_config(DEFAULT, [f"run.root={tmp_path}", *QUIET])
    stage, out = PretrainStage(), cfg.paths.pretrain
    assert stage.status(cfg).state == "fresh"
    tag = out / "deepspeed" / "global_step3"
    tag.mkdir(parents=True)
    (out / "deepspeed" / "latest").write_text("global_step3")
    resume = stage.status(cfg)
    assert resume.state == "resume" and resume.detail.endswith("global_step3")
    (out / "deepspeed" / "latest").write_text("")  # unusable: the newest tag, as the stage would try first
    (out / "deepspeed" / "global_step5").mkdir()
    assert stage.status(cfg).state == "resume" and "global_step5" in stage.status(cfg).detail
    for name in ("backbone.pt", "adapter.pt"):
        checkpoint.save_atomic({"w": np.arange(3)}, out / name)
    outputs = {name: checkpoint.file_identity(out / name, digest=True) for name in ("backbone.pt", "adapter.pt")}
    (out / "metrics.json").write_text(json.dumps({"steps": 6, "outputs": outputs}))
    assert stage.status(cfg).complete and stage.outputs(cfg) == [
        out / "backbone.pt",
        out / "adapter.pt",
        out / "metrics.json",
    ]
    checkpoint.save_atomic({"w": np.arange(4)}, out / "adapter.pt")  # replaced since: rewritten from the tags
    assert stage.status(cfg).state == "resume"


def test_federate_and_baseline_status_fresh_partial_complete(tmp_path):
    keys = [
        f"run.root={tmp_path}",
        "federated.rounds=2",
        "federated.num_clients=4",
        "federated.clients_per_round=2",
        "data.samples_per_class=20",
        "data.test_per_class=5",
        *QUIET,
    ]
    cfg = load_config(SMOKE, keys)
    stage, baseline = FederateStage(), FederateStage("baseline", baseline_config)
    assert stage.status(cfg).state == "fresh" and baseline.status(cfg).state == "fresh"
    assert baseline.outputs(cfg)[0] == cfg.run_dir / "baseline" / "federated" / "checkpoint.pt"
    assert main(["federate", str(SMOKE), *sets(*keys)]) == 0
    assert stage.status(cfg).complete and all(p.is_file() for p in stage.outputs(cfg))
    more = stage.status(load_config(SMOKE, [*keys, "federated.rounds=3"]))
    assert more.state == "resume" and "round 2 of 3" in more.detail
    # another config: not complete, so the stage runs and refuses it in its own words
    assert stage.status(load_config(SMOKE, [*keys, "federated.lr=0.5"])).state == "resume"
    assert baseline.status(cfg).state == "fresh"  # the baseline is a run directory of its own
    cfg.paths.summary.unlink()  # written last: the final model and summary are still to write
    assert stage.status(cfg).state == "resume"


def test_run_skips_complete_stages_and_a_rerun_rewrites_only_the_report(tmp_path, caplog):
    keys = [
        f"run.root={tmp_path}",
        "federated.rounds=2",
        "federated.num_clients=4",
        "federated.clients_per_round=2",
        "data.samples_per_class=20",
        "data.test_per_class=5",
        *QUIET,
    ]
    argv = ["run", str(SMOKE), *sets(*keys)]
    with caplog.at_level(logging.INFO, logger="mllmfl_dist"):
        assert main(argv) == 0
    assert "stage federate: starting" in caplog.text and "stage report: starting" in caplog.text
    paths = load_config(SMOKE, keys).paths
    watched = [paths.checkpoint, paths.final_model, paths.summary, paths.metrics, paths.rounds, paths.config]
    stamps = [p.stat().st_mtime_ns for p in watched]
    report = (paths.report / "summary.json").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mllmfl_dist"):
        assert main(argv) == 0
    assert "stage federate: complete, skipped" in caplog.text
    assert [p.stat().st_mtime_ns for p in watched] == stamps
    assert (paths.report / "summary.json").stat().st_mtime_ns > report
