"""``compare``: method names that say what ran, the table's columns, seeds with mean +- std, resume per row."""

import csv
import json
import statistics
from pathlib import Path

import pytest

from launchers import FAST, SMOKE, cli

from mllmfl_dist.config import ConfigError, load_config
from mllmfl_dist.commands.compare import method_config
from mllmfl_dist.commands.compare_methods import Method, parse_method, parse_methods
from mllmfl_dist.commands.compare_table import results_markdown


def test_a_rows_name_says_what_ran():
    cfg = load_config(SMOKE, ["annotate.model=some/llava", "clip2fl.model=local-dir:clip"])
    assert parse_method("fedavg", cfg).name == "fedavg"
    assert parse_method("fedavg+align[none]", cfg) == Method("fedavg", teacher="none")
    assert parse_method("fedprox+dwp[llava]", cfg).name == "fedprox+dwp[llava]"
    # Only DWP from the MLLM plus alignment with the MLLM teacher is the full method.
    assert parse_method("fedavg+dwp[llava]+align[llava]", cfg).name == "mllm-llava-fl"
    assert parse_method("mllm-llava-fl", cfg) == Method("fedavg", dwp=True, teacher="llava")
    assert parse_method("fedavg+dwp[llava]+align[clip]", cfg).name == "fedavg+dwp[llava]+align[clip]"
    assert parse_method("creff+align[llava]", cfg).dirname == "creff+align-llava"
    # `config` is named by what the config runs.
    aligned = load_config(SMOKE, ["align.every=2", "align.teacher=none"])
    assert parse_method("config", aligned).name == "fedavg+align[none]"
    assert parse_method("config", cfg).name == "fedavg"
    with pytest.raises(ConfigError, match="names fedavg twice"):
        parse_methods("fedavg,config", cfg)
    for bad in ("mllm", "fedsgd", "fedavg+align[gpt]", "fedavg+dwp[clip]", "align[none]"):
        with pytest.raises(ConfigError, match="unknown method"):
            parse_method(bad, cfg)


def test_a_rows_config_is_the_strategy_with_only_the_stages_it_names():
    cfg = load_config(
        SMOKE,
        [
            "annotate.model=some/llava",
            "clip2fl.model=local-dir:clip",
            "align.every=3",
            "align.teacher=llava",
            "align.teacher_model=other/llava",
            "model.pretrained_backbone=pretrain",
        ],
    )
    plain = method_config(cfg, parse_method("creff", cfg), seed=4)
    assert (plain.federated.strategy, plain.align.every, plain.model.pretrained_backbone) == ("creff", 0, "")
    assert plain.run.seed == 4 and plain.run_dir.parts[-3:] == ("compare", "creff", "seed4")
    clip = method_config(cfg, parse_method("fedavg+align[clip]", cfg))
    assert (clip.align.every, clip.align.teacher, clip.align.teacher_model) == (3, "clip", "local-dir:clip")
    llava = method_config(cfg, parse_method("mllm-llava-fl", cfg), seed=1)
    assert llava.align.teacher_model == "other/llava"
    # Every +dwp row of a seed starts from the one stage-1 backbone of that seed.
    assert Path(llava.model.pretrained_backbone).parts[-5:] == ("compare", "stage1", "seed1", "pretrain", "backbone.pt")
    assert not llava.run.baseline and not plain.run.baseline  # compare's fedavg row is the baseline
    no_models = load_config(SMOKE)
    with pytest.raises(ConfigError, match="clip2fl.model"):
        method_config(no_models, parse_method("fedavg+align[clip]", no_models))
    with pytest.raises(ConfigError, match="annotate.model"):
        method_config(no_models, parse_method("fedavg+dwp[llava]", no_models))


def test_compare_over_two_seeds_gives_mean_and_std_and_resumes_per_row(tmp_path, tiny_models, capsys):
    sets = [
        f"run.root={tmp_path}",
        "federated.rounds=2",
        *FAST,
        f"clip2fl.model=local-dir:{tiny_models['clip']}",
        "align.source=holdout",
        "data.server_holdout_per_class=5",
        "align.per_class=5",
        "align.steps=5",
    ]
    methods = ["fedavg", "fedprox", "creff", "clip2fl", "fedavg+align[none]"]
    assert cli("compare", str(SMOKE), "--methods", ",".join(methods), "--seeds", "0,1", sets=sets) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "smoke" / "compare"
    per_seed = list(csv.DictReader((out / "results_per_seed.csv").open()))
    assert [(r["method"], r["seed"]) for r in per_seed] == [(m, s) for m in methods for s in "01"]
    for row in per_seed:
        run = out / row["method"].replace("[", "-").replace("]", "") / f"seed{row['seed']}" / "federated"
        final = [json.loads(line) for line in (run / "metrics.jsonl").open()][-1]
        assert row["rounds"] == "2" and float(row["acc"]) == pytest.approx(final["acc"])
        assert float(row["acc_top1"]) == pytest.approx(final["acc_top1"]) and float(row["wall_seconds"]) > 0
    summary = {r["method"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert list(summary) == methods
    for method, row in summary.items():
        values = [float(r["acc"]) for r in per_seed if r["method"] == method]
        assert float(row["acc_mean"]) == pytest.approx(statistics.fmean(values))
        assert float(row["acc_std"]) == pytest.approx(statistics.stdev(values))
        assert row["seeds"] == "0 1"
    # What ran, in its own columns: only the alignment row used server-held labels (5 per class).
    assert summary["fedavg+align[none]"]["server_labeled_images"] == "50"
    assert summary["fedavg+align[none]"]["align_teacher"] == "none (labels only)"
    assert {summary[m]["server_labeled_images"] for m in methods[:4]} == {"0"}
    assert {summary[m]["pretraining"] for m in methods} == {"none (random init)"}
    assert summary["clip2fl"]["models"] == f"CLIP2FL's CLIP local-dir:{tiny_models['clip']}"
    assert {summary[m]["models"] for m in ("fedavg", "creff", "fedavg+align[none]")} == {"none"}
    assert summary["creff"]["strategy"] == "creff" and summary["fedavg+align[none]"]["strategy"] == "fedavg"
    markdown = (out / "results.md").read_text()
    assert printed.startswith(markdown.splitlines()[0])
    assert markdown.count(" ± ") >= 5 * len(methods) and "| fedavg+align[none] | none (random init) |" in markdown
    assert "seeds 0, 1" in markdown and "Measured with 1 rank(s)" in markdown
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "before_align" in (out / "fedavg+align-none" / "seed0" / "federated" / "metrics.jsonl").read_text()
    assert "before_align" not in (out / "fedavg" / "seed0" / "federated" / "metrics.jsonl").read_text()

    # A rerun with one more method trains only that one; the finished ones are left as they are.
    rounds = {p: p.read_text() for p in out.glob("*/seed*/federated/rounds.jsonl")}
    assert cli("compare", str(SMOKE), "--methods", ",".join([*methods, "fedavgm"]), "--seeds", "0,1", sets=sets) == 0
    assert all(p.read_text() == text for p, text in rounds.items())
    assert list(csv.DictReader((out / "results.csv").open()))[-1]["method"] == "fedavgm"


def test_a_single_seed_table_prints_three_decimals():
    row = {
        "method": "fedavg",
        "seed": 0,
        "strategy": "fedavg",
        "pretraining": "none (random init)",
        "align_teacher": "no alignment",
        "server_labeled_images": 0,
        "models": "none",
        "rounds": 30,
        "acc": 0.123456,
        "acc_top1": 0.2,
        "acc_many": 0.3456789,
        "acc_medium": None,
        "acc_few": None,
        "wall_seconds": 12.34,
        "bytes_all_reduced_per_round": 1000,
    }
    line = results_markdown([row]).splitlines()[2]
    assert "| 0.123 | 0.200 | 0.346 | — | — | 12.3 | none |" in line and "±" not in line


def test_compare_refuses_bad_input_before_running_anything(tmp_path, capsys):
    sets = [f"run.root={tmp_path}"]
    assert cli("compare", str(SMOKE), "--methods", "fedavg,fedsgd", sets=sets) == 2
    assert "fedsgd" in capsys.readouterr().err
    assert cli("compare", str(SMOKE), "--methods", "fedavg,mllm", sets=sets) == 2
    assert "mllm-llava-fl" in capsys.readouterr().err
    assert cli("compare", str(SMOKE), "--methods", "clip2fl", sets=sets) == 2
    assert "clip2fl.model" in capsys.readouterr().err
    missing = tmp_path / "no_clip"
    assert (
        cli("compare", str(SMOKE), "--methods", "fedavg,clip2fl", sets=[*sets, f"clip2fl.model=local-dir:{missing}"])
        == 2
    )
    assert str(missing) in capsys.readouterr().err
    assert cli("compare", str(SMOKE), "--methods", "fedavg", "--seeds", "0,x", sets=sets) == 2
    assert "--seeds" in capsys.readouterr().err
    assert cli("compare", str(SMOKE), "--methods", "fedavg+dwp[llava]", sets=sets) == 2
    assert "annotate.model" in capsys.readouterr().err
    assert not (tmp_path / "smoke").exists()
