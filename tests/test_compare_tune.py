"""``compare --tune`` and the table's statistics: selection on validation (never test) accuracy, keys a method
does not read, equal budgets, resume of tuning runs, and the t-intervals against a hand computation."""

import csv
import dataclasses
import io
import json
import math

import pytest

from launchers import FAST, SMOKE, cli

from mllmfl_dist.commands.compare import method_config, row_root, tune_root
from mllmfl_dist.commands.compare_methods import Method
from mllmfl_dist.commands.compare_table import results_csv, results_markdown, summarize
from mllmfl_dist.commands.seed_statistics import (
    first_round_reaching,
    interval_text,
    last_mean,
    paired_difference,
    spread,
    t_quantile,
)
from mllmfl_dist.commands.tuning import (
    TuneSpec,
    config_id,
    method_grid,
    parse_tune,
    parse_tune_seeds,
    reads,
    select_config,
)
from mllmfl_dist.config import ConfigError, DataConfig, load_config


def test_paired_difference_interval_matches_a_hand_computation():
    # diffs 0.02, 0.05, 0.01, 0.04, 0.03: mean 0.03; squared deviations sum to 0.001, so sd = sqrt(0.001 / 4)
    # = 0.0158114; t_{0.975, 4} = 2.776445; half-width = 2.776445 * 0.0158114 / sqrt(5) = 0.0196324.
    method = {0: 0.52, 1: 0.55, 2: 0.51, 3: 0.54, 4: 0.53}
    fedavg = {s: 0.50 for s in range(5)}
    diff = paired_difference(method, fedavg)
    assert diff.n == 5 and diff.mean == pytest.approx(0.03)
    assert diff.sd == pytest.approx(0.0158114, abs=1e-6)
    assert t_quantile(4) == pytest.approx(2.776445, abs=1e-6)
    assert diff.ci95 == pytest.approx(0.0196324, abs=1e-6)
    # Unpaired spread of the row itself: the same numbers shifted by 0.5.
    assert spread(list(method.values())).ci95 == pytest.approx(diff.ci95)
    assert paired_difference({0: 0.6, 9: 0.7}, {0: 0.5}).n == 1  # seed 9 has no fedavg run to pair with
    assert (spread([0.4]).sd, spread([0.4]).ci95, spread([]).mean) == (None, None, None)
    # The examples' table cell: mean +- sd [mean - half-width, mean + half-width] (0.53 +- 0.0158 [0.5104, 0.5496]).
    assert interval_text(spread(list(method.values()))) == "0.530 +- 0.016 [0.510, 0.550]"
    assert (interval_text(spread([0.4])), interval_text(spread([]))) == ("0.400", "-")


def test_last_evaluations_and_rounds_to_target():
    evaluations = [{"round": r, "acc": a} for r, a in ((1, 0.2), (2, 0.5), (3, 0.4), (4, 0.6))]
    assert last_mean(evaluations, "acc", 3) == pytest.approx(0.5)
    assert last_mean(evaluations[:2], "acc", 3) == pytest.approx(0.35)  # fewer evaluations than asked for
    assert last_mean(evaluations, "val_acc", 3) is None
    assert first_round_reaching(evaluations, 0.45) == 2 and first_round_reaching(evaluations, 0.6) == 4
    assert first_round_reaching(evaluations, 0.61) is None


def _records(test: float, val: float | None, rounds: int = 4) -> list[dict]:
    return [{"round": r, "acc": test, **({"val_acc": val} if val is not None else {})} for r in range(1, rounds + 1)]


def test_selection_follows_validation_not_test_accuracy():
    settings = [{"federated.lr": 0.01}, {"federated.lr": 0.05}, {"federated.lr": 0.2}]
    # lr 0.2 is best on test, lr 0.05 on validation (averaged over the two tuning seeds).
    evaluations = [
        {100: _records(0.50, 0.40), 101: _records(0.52, 0.42)},
        {100: _records(0.55, 0.60), 101: _records(0.51, 0.56)},
        {100: _records(0.70, 0.30), 101: _records(0.72, 0.70)},
    ]
    choice = select_config(settings, evaluations, last=3)
    assert choice["chosen_values"] == {"federated.lr": 0.05} and choice["chosen_index"] == 1
    assert choice["configs"][2]["val_mean"] == pytest.approx(0.50)
    assert choice["configs"][1]["val_by_seed"] == {100: pytest.approx(0.60), 101: pytest.approx(0.56)}
    # Only the last 3 evaluations count: an early peak of validation accuracy does not.
    early_peak = [{"round": 1, "acc": 0.1, "val_acc": 0.99}, *_records(0.1, 0.2)[1:]]
    assert select_config(settings[:2], [{100: early_peak}, {100: _records(0.1, 0.3)}], 3)["chosen_index"] == 1
    # A tie goes to the configuration earlier in grid order.
    tie = [{100: _records(0.5, 0.5)}, {100: _records(0.9, 0.5)}]
    assert select_config(settings[:2], tie, 3)["chosen_index"] == 0
    with pytest.raises(ConfigError, match="data.val_per_class"):
        select_config(settings[:2], [{100: _records(0.5, None)}, {100: _records(0.5, 0.5)}], 3)


def test_keys_a_method_does_not_read_are_ignored_and_budgets_are_equal():
    grid = parse_tune(
        [
            "federated.lr=0.01,0.05",
            "federated.prox_mu=0.001,0.01,0.1",
            "federated.server_momentum=0.9",
            "creff.match_epochs=50,100",
            "align.lr=0.001,0.01",
            "pretrain.steps=10,20",
            "federated.local_epochs=1,2",
        ]
    )
    assert grid["federated.local_epochs"] == (1, 2) and grid["federated.lr"] == (0.01, 0.05)  # typed as the field
    spec = TuneSpec(grid, budget=3, seeds=(100, 101), last=3, sample_seed=0)
    fedavg, fedprox, fedavgm = Method("fedavg"), Method("fedprox"), Method("fedavgm")
    creff, aligned, dwp = Method("creff"), Method("fedavg", teacher="none"), Method("fedavg", dwp=True)
    assert not reads(fedavg, "federated.prox_mu") and reads(fedprox, "federated.prox_mu")
    assert reads(fedavgm, "federated.server_momentum") and not reads(fedprox, "federated.server_momentum")
    assert reads(creff, "creff.match_epochs") and not reads(fedavg, "creff.match_epochs")
    # CLIP2FL declares [creff] as well as [clip2fl] (its server step is CReFF's); CReFF reads no [clip2fl] key.
    assert reads(Method("clip2fl"), "creff.match_epochs") and not reads(creff, "clip2fl.alpha")
    assert reads(aligned, "align.lr") and reads(Method("fedavg", teacher="llava"), "align.lr")
    assert not reads(fedavg, "align.lr") and not reads(aligned, "pretrain.steps") and reads(dwp, "pretrain.steps")
    for method, keys in (
        (fedavg, {"federated.lr", "federated.local_epochs"}),
        (fedprox, {"federated.lr", "federated.local_epochs", "federated.prox_mu"}),
        (creff, {"federated.lr", "federated.local_epochs", "creff.match_epochs"}),
        (aligned, {"federated.lr", "federated.local_epochs", "align.lr"}),
    ):
        settings = method_grid(method, spec)
        assert len(settings) == 3  # every grid has at least 3 configurations: each gets exactly the budget
        assert all(set(s) == keys for s in settings) and len({config_id(s) for s in settings}) == 3
        assert settings == method_grid(method, spec)  # seeded: the same sample every time
    assert method_grid(fedavg, dataclasses.replace(spec, budget=10)) == [
        {"federated.lr": lr, "federated.local_epochs": e} for lr in (0.01, 0.05) for e in (1, 2)
    ]  # the whole grid
    assert method_grid(fedavg, TuneSpec({"creff.match_epochs": (5, 6)})) == [{}]


def test_tune_options_are_checked():
    for bad, words in (
        (["data.imb_factor=0.1,0.01"], "compare tunes"),
        (["align.teacher=none,clip"], "row's name"),
        (["federated.lr=0.1", "federated.lr=0.2"], "twice"),
        (["federated.lr=0.1,0.1"], "twice"),
        (["federated.lr="], "section.key=v1"),
        (["federated.lr=fast"], "a number"),
        (["federated.nothing=1"], "unknown key"),
    ):
        with pytest.raises(ConfigError, match=words):
            parse_tune(bad)
    assert parse_tune_seeds(None, [0, 1, 2]) == (100, 101) and parse_tune_seeds(None, [100, 5]) == (101, 102)
    with pytest.raises(ConfigError, match="reporting seeds"):
        parse_tune_seeds("1,100", [0, 1])


def test_a_tuned_setting_runs_in_its_own_folder_with_its_values():
    cfg = load_config(SMOKE, ["run.root=/tmp/x"])
    setting = {"federated.lr": 0.2, "creff.match_epochs": 7}
    tuned = method_config(cfg, Method("creff"), 100, setting, tune_root(cfg, Method("creff"), setting))
    assert (tuned.federated.lr, tuned.section("creff").match_epochs, tuned.run.seed) == (0.2, 7, 100)
    assert tuned.run_dir.parts[-5:] == ("compare", "tune", "creff", config_id(setting), "seed100")
    assert method_config(cfg, Method("creff"), 0, setting).run_dir == row_root(cfg, Method("creff"), setting) / "seed0"
    assert method_config(cfg, Method("fedavg"), 0).run_dir.parts[-3:] == ("compare", "fedavg", "seed0")
    assert config_id({"federated.lr": 0.05}) == config_id({"federated.lr": 5e-2}) != config_id({"align.lr": 0.05})
    with pytest.raises(ConfigError, match=r"method fedavg \(federated.lr=-1.0\)"):
        method_config(cfg, Method("fedavg"), 0, {"federated.lr": -1.0})


def _row(method: str, seed: int, accs: list[float]) -> dict:
    evaluations = [{"round": r + 1, "acc": a} for r, a in enumerate(accs)]
    return {
        "method": method,
        "seed": seed,
        "strategy": method,
        "pretraining": "none (random init)",
        "align_teacher": "no alignment",
        "server_labeled_images": 0,
        "models": "none",
        "rounds": len(accs),
        "acc": accs[-1],
        "acc_top1": accs[-1],
        "acc_many": None,
        "acc_medium": None,
        "acc_few": None,
        "wall_seconds": 1.0,
        "bytes_all_reduced_per_round": 10,
        "acc_last": last_mean(evaluations, "acc", 2),
        "last_evaluations": 2,
        "target_acc": 0.5,
        "rounds_to_target": first_round_reaching(evaluations, 0.5),
        "tuned": "federated.lr=0.05" if method == "fedprox" else "",
        "tuned_configs": 3,
    }


def test_the_table_has_the_intervals_paired_differences_and_rounds_to_target():
    diffs = [0.02, 0.05, 0.01, 0.04, 0.03]
    rows = [
        *(_row("fedavg", s, [0.3, 0.5, 0.50]) for s in range(5)),
        *(_row("fedprox", s, [0.3, 0.4 + d, 0.50 + d]) for s, d in enumerate(diffs)),
    ]
    fedprox = summarize(rows)[1]
    assert fedprox["acc_minus_fedavg_mean"] == pytest.approx(0.03)
    assert fedprox["acc_minus_fedavg_ci95"] == pytest.approx(0.0196324, abs=1e-6)
    # Last 2 evaluations: fedprox (0.4 + d + 0.5 + d) / 2 = 0.45 + d, fedavg 0.5: differences d - 0.05.
    assert fedprox["acc_last_minus_fedavg_mean"] == pytest.approx(0.03 - 0.05)
    assert fedprox["acc_last_minus_fedavg_sd"] == pytest.approx(math.sqrt(0.001 / 4))
    assert summarize(rows)[0]["acc_minus_fedavg_mean"] is None  # fedavg is not paired with itself
    # fedprox is at 0.4 + d < 0.5 in round 2 and 0.5 + d in round 3: round 3 on every seed.
    assert (fedprox["rounds_to_target_mean"], fedprox["target_reached"]) == (3, "5/5")
    markdown = results_markdown(rows)
    assert "balanced acc, mean of last 2 evaluations" in markdown and "rounds to balanced test acc 0.5" in markdown
    assert "| fedprox | federated.lr=0.05 (3) | 0.530 ± 0.016 (95% CI ± 0.020) |" in markdown
    assert "+0.030 ± 0.016 (95% CI ± 0.020)" in markdown
    header, fedprox_csv = list(csv.reader(io.StringIO(results_csv(rows))))[::2]
    assert len(header) == len(set(header))  # one column a name
    assert float(dict(zip(header, fedprox_csv))["acc_ci95"]) == pytest.approx(0.0196324, abs=1e-6)


def _val_split() -> list[str]:
    """A validation split where the code base has one (data.val_per_class); otherwise none."""
    return ["data.val_per_class=5"] if "val_per_class" in {f.name for f in dataclasses.fields(DataConfig)} else []


def test_compare_tune_selects_on_validation_and_resumes_tuning_runs(tmp_path, capsys):
    sets = [f"run.root={tmp_path}", "federated.rounds=2", *FAST, *_val_split()]
    argv = [
        "compare",
        str(SMOKE),
        "--methods",
        "fedavg,fedprox",
        "--seeds",
        "0",
        "--tune",
        "federated.lr=0.01,0.1",
        "--tune",
        "federated.prox_mu=0.001,0.1",
        "--tune-budget",
        "2",
        "--tune-seeds",
        "100",
        "--target",
        "0.05",
    ]
    out = tmp_path / "smoke" / "compare"
    code = cli(*argv, sets=sets)
    if not _val_split():  # before the validation split exists: refused after the tuning runs, naming the key
        assert code == 2 and "data.val_per_class" in capsys.readouterr().err
        assert not (out / "tuning.json").exists()
    else:
        assert code == 0
    tune_runs = sorted(out.glob("tune/*/*/seed100/federated"))
    assert [p.parts[-4] for p in tune_runs] == ["fedavg", "fedavg", "fedprox", "fedprox"]  # 2 configurations each
    # Validation disagrees with test on purpose: the configuration with the lowest test accuracy is best on
    # validation, and the choice must follow validation.
    test_last, val_best = {}, {}
    for run in tune_runs:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        test_last[run] = last_mean([r for r in records if "acc" in r], "acc", 3)
    for method in ("fedavg", "fedprox"):
        runs = [r for r in tune_runs if r.parts[-4] == method]
        assert test_last[runs[0]] != test_last[runs[1]]
        val_best[method] = min(runs, key=test_last.get).parts[-3]
        for run in runs:
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            val = 0.9 if run.parts[-3] == val_best[method] else 0.1
            (run / "metrics.jsonl").write_text(
                "".join(json.dumps({**r, "val_acc": val} if "acc" in r else r) + "\n" for r in records)
            )
    trained = {p: p.read_text() for p in out.glob("tune/*/*/seed100/federated/rounds.jsonl")}
    assert cli(*argv, sets=sets) == 0
    assert all(p.read_text() == text for p, text in trained.items())  # the tuning runs were not trained again
    tuning = json.loads((out / "tuning.json").read_text())
    assert tuning["tune_seeds"] == [100] and tuning["budget"] == 2
    assert tuning["methods"]["fedavg"]["keys"] == ["federated.lr"]  # prox_mu is not fedavg's
    assert (tuning["methods"]["fedprox"]["grid_size"], tuning["methods"]["fedprox"]["tried"]) == (4, 2)
    summary = {r["method"]: r for r in csv.DictReader((out / "results.csv").open())}
    for method in ("fedavg", "fedprox"):
        entry = tuning["methods"][method]
        assert entry["chosen"] == val_best[method]
        chosen = ", ".join(f"{k}={v}" for k, v in entry["chosen_values"].items())
        assert summary[method]["tuned"] == chosen and summary[method]["tuned_configs"] == "2"
        assert (out / method / entry["chosen"] / "seed0" / "federated" / "model_final.pt").is_file()
    assert summary["fedavg"]["target_acc"] == "0.05" and summary["fedavg"]["last_evaluations"] == "3"
    assert summary["fedprox"]["acc_minus_fedavg_mean"] != ""
    assert "tuned setting (configurations tried)" in (out / "results.md").read_text()


def test_compare_tune_refuses_bad_values_before_running_anything(tmp_path, capsys):
    sets = [f"run.root={tmp_path}", *_val_split()]
    assert cli("compare", str(SMOKE), "--methods", "fedavg", "--tune", "federated.lr=0.1,-1", sets=sets) == 2
    assert "federated.lr" in capsys.readouterr().err
    assert cli("compare", str(SMOKE), "--methods", "fedavg", "--tune", "data.imb_factor=0.1,0.2", sets=sets) == 2
    assert "--tune data.imb_factor: compare tunes" in capsys.readouterr().err
    assert cli("compare", str(SMOKE), "--methods", "fedavg", "--tune-seeds", "5", sets=sets) == 2
    assert "--tune" in capsys.readouterr().err
    if not _val_split():
        assert not (tmp_path / "smoke").exists()
        return
    assert (
        cli(
            "compare",
            str(SMOKE),
            "--methods",
            "fedavg",
            "--tune",
            "federated.lr=0.1,0.2",
            sets=[f"run.root={tmp_path}", "data.val_per_class=0"],
        )
        == 2
    )
    assert "data.val_per_class" in capsys.readouterr().err
    assert not (tmp_path / "smoke").exists()


def test_tuned_values_are_expanded_and_teacher_only_keys_are_not_read_without_that_teacher():
    from pathlib import Path

    assert parse_tune(["clip2fl.model=~/a,~/b"])["clip2fl.model"] == (f"{Path.home()}/a", f"{Path.home()}/b")
    plain, smoothing, llava = (
        Method("fedavg", teacher="none"),
        Method("fedavg", teacher="uniform"),
        Method("fedavg", teacher="llava"),
    )
    assert reads(plain, "align.lr") and not reads(plain, "align.beta") and not reads(plain, "align.temperature")
    assert reads(smoothing, "align.beta") and not reads(smoothing, "align.teacher_temperature")
    assert reads(llava, "align.teacher_score") and not reads(llava, "align.templates")


def test_a_world_the_dwp_rows_global_batch_does_not_split_over_is_refused_before_any_row():
    from mllmfl_dist.commands.compare import check_stage1_world

    overrides = ["pretrain.micro_batch_size=8", "pretrain.global_batch_size=24", "annotate.model=llava-dir"]
    cfg = load_config(SMOKE, overrides)
    dwp, plain = Method("fedavg", dwp=True), Method("fedavg")
    for world in (1, 3):
        check_stage1_world(cfg, [plain, dwp], None, world)
    with pytest.raises(ConfigError, match="over 2 processes; run DWP on 1, 3 processes"):
        check_stage1_world(cfg, [plain, dwp], None, 2)
    check_stage1_world(cfg, [plain, Method("creff")], None, 2)  # no +dwp row: nothing to refuse
    # a tuned stage-1 setting is checked too: 24 samples in micro-batches of 12 split over 2 processes
    spec = TuneSpec(parse_tune(["pretrain.micro_batch_size=8,12"]), budget=2, seeds=(100,), last=3, sample_seed=0)
    with pytest.raises(ConfigError, match="over 2 processes"):
        check_stage1_world(cfg, [dwp], spec, 2)
