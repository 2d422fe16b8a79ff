"""Sweeps: run.name templates over config values, and federate --seeds with a line per seed and mean +- std."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from mllmfl_dist.__main__ import main
from mllmfl_dist.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.toml"


def test_run_name_template_is_resolved_after_the_overrides() -> None:
    cfg = load_config(
        SMOKE,
        [
            "run.name={federated.strategy}-a{partition.alpha}-s{run.seed}",
            "run.seed=2",
            "federated.strategy=fedprox",
            "partition.alpha=0.1",
        ],
    )
    assert cfg.run.name == "fedprox-a0.1-s2" and cfg.run_dir == Path("runs/fedprox-a0.1-s2")
    cfg = load_config(SMOKE, ["run.name=lr{federated.lr:.0e}-{pretrain.deepspeed.zero_stage}"])
    assert cfg.run.name == "lr5e-02-0"
    # config.toml records the resolved name
    assert 'name = "fedavg"' in load_config(SMOKE, ["run.name={federated.strategy}"]).to_toml()


@pytest.mark.parametrize(
    "template,message",
    [
        ("{federated.nope}", "{federated.nope} is not a config key"),
        ("{run.name}x", "{run.name} is not a config key"),
        ("x{federated.lr:d}", "cannot format {federated.lr}"),
        ("{oops", "not a valid template"),
        ("{data.train_shards}", "non-empty name"),
    ],
)
def test_a_bad_template_is_one_clear_config_error(template, message, capsys) -> None:
    with pytest.raises(ConfigError, match="run.name") as err:
        load_config(SMOKE, [f"run.name={template}"])
    assert message in str(err.value)
    assert main(["federate", str(SMOKE), "--set", f"run.name={template}"]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("mllmfl_dist: error: run.name")


def finals_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "federated" / "metrics.jsonl").read_text().splitlines()[-1])


def test_federate_seeds_runs_each_seed_in_its_own_directory_and_reports_mean_and_std(tmp_path, capsys) -> None:
    sets = [
        "--set",
        f"run.root={tmp_path}",
        "--set",
        "federated.rounds=1",
        "--set",
        "log.progress=false",
        "--set",
        "log.tensorboard=false",
    ]
    assert main(["federate", str(SMOKE), "--seeds", "0,1", *sets]) == 0
    out = capsys.readouterr().out
    finals = [finals_of(tmp_path / f"smoke-seed{seed}") for seed in (0, 1)]
    for seed, final in zip((0, 1), finals):
        assert f"seed {seed}: balanced acc {final['acc']:.4f}" in out
        assert f"in {tmp_path / f'smoke-seed{seed}'}" in out
    accs = [f["acc"] for f in finals]
    assert f"mean +- std over 2 seeds: acc {statistics.fmean(accs):.4f} +- {statistics.stdev(accs):.4f}" in out
    partitions = [
        json.loads((tmp_path / f"smoke-seed{seed}" / "federated" / "partition.json").read_text()) for seed in (0, 1)
    ]
    assert [p["seed"] for p in partitions] == [0, 1] and partitions[0]["class_counts"] != partitions[1]["class_counts"]

    # With {run.seed} in the name the directories are the template's.
    assert main(["federate", str(SMOKE), "--seeds", "2,3", *sets, "--set", "run.name=sweep-s{run.seed}"]) == 0
    assert (tmp_path / "sweep-s2" / "federated").is_dir() and (tmp_path / "sweep-s3" / "federated").is_dir()
    assert main(["federate", str(SMOKE), "--seeds", "0,x", *sets]) == 2


def test_run_seeds_gives_each_seed_its_report(tmp_path, capsys) -> None:
    sets = [
        "--set",
        f"run.root={tmp_path}",
        "--set",
        "federated.rounds=1",
        "--set",
        "log.progress=false",
        "--set",
        "log.tensorboard=false",
        "--set",
        "run.name=r{run.seed}",
    ]
    assert main(["run", str(SMOKE), "--seeds", "4,5", *sets]) == 0
    out = capsys.readouterr().out
    for seed in (4, 5):
        assert (tmp_path / f"r{seed}" / "report" / "summary.json").is_file()
        assert f"seed {seed}: balanced acc {finals_of(tmp_path / f'r{seed}')['acc']:.4f}" in out
    assert "mean +- std over 2 seeds: acc" in out
