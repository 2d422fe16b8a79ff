"""Config loading, typed overrides and the errors a user can cause (exit code 2, key named)."""

from pathlib import Path

import pytest

from mllmfl_dist.__main__ import main
from mllmfl_dist.config import Config, ConfigError, load_config, resume_differences

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_starts_with_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.run.name == path.stem
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# ") and "mllmfl_dist" in first_line and path.name in first_line


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"smoke.toml", "fmnist_lt.toml", "cifar10_lt.toml", "cifar100_lt.toml"} <= names


def test_fmnist_lt_is_the_documented_workload():
    cfg = load_config(Path(CONFIGS[0]).parent / "fmnist_lt.toml")
    assert (cfg.data.source, cfg.data.imb_factor) == ("fashion_mnist", 0.01)
    assert (cfg.partition.method, cfg.partition.alpha) == ("dirichlet", 0.5)
    fed = cfg.federated
    assert (fed.num_clients, fed.clients_per_round, fed.local_epochs, fed.batch_size, fed.lr) == (100, 10, 1, 32, 0.05)
    assert (cfg.model.arch, cfg.model.width_scale, cfg.model.in_channels) == ("resnet8", 1, 1)


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text("[federated]\nlr = 0.1\n")
    cfg = load_config(path, ["federated.lr=0.5", "federated.rounds=7", "data.download=true", "run.name=abc"])
    assert cfg.federated.lr == 0.5 and cfg.federated.rounds == 7
    assert cfg.data.download is True
    assert cfg.run_dir == Path("runs") / "abc"


def test_nested_tables_and_their_overrides(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text("[pretrain]\nsteps = 10\n\n[pretrain.deepspeed]\nzero_stage = 1\nlr = 0.01\n")
    cfg = load_config(path, ["pretrain.deepspeed.gradient_accumulation_steps=4"])
    assert cfg.pretrain.steps == 10
    assert cfg.pretrain.deepspeed.zero_stage == 1 and cfg.pretrain.deepspeed.lr == 0.01
    assert cfg.pretrain.deepspeed.gradient_accumulation_steps == 4
    assert "[pretrain.deepspeed]" in cfg.to_toml()
    with pytest.raises(ConfigError, match="pretrain.deepspeed.stage"):
        load_config(path, ["pretrain.deepspeed.stage=1"])
    with pytest.raises(ConfigError, match="names a table"):
        load_config(path, ["pretrain.deepspeed=1"])
    with pytest.raises(ConfigError, match="pretrain.deepspeed.zero_stage"):
        load_config(path, ["pretrain.deepspeed.zero_stage=5"])
    # a fixed global batch: a multiple of the micro-batch, and not beside an accumulation of its own
    assert load_config(path, ["pretrain.global_batch_size=24"]).pretrain.global_batch_size == 24
    with pytest.raises(ConfigError, match="global_batch_size = 20 is not a multiple of pretrain.micro_batch_size"):
        load_config(path, ["pretrain.global_batch_size=20"])
    with pytest.raises(ConfigError, match="global_batch_size and pretrain.deepspeed.gradient_accumulation_steps"):
        load_config(path, ["pretrain.global_batch_size=24", "pretrain.deepspeed.gradient_accumulation_steps=4"])
    path.write_text("[pretrain]\ndeepspeed = 3\n")
    with pytest.raises(ConfigError, match=r"\[pretrain.deepspeed\] must be a table"):
        load_config(path)


def test_run_name_defaults_to_file_stem_and_resolved_config_round_trips(tmp_path):
    path = tmp_path / "my_exp.toml"
    path.write_text("[federated]\nrounds = 3\n")
    cfg = load_config(path)
    assert cfg.run.name == "my_exp"
    again = tmp_path / "resolved.toml"
    again.write_text(cfg.to_toml())
    assert load_config(again) == cfg


@pytest.mark.parametrize(
    "text, overrides, named",
    [
        ("[nosuch]\nx = 1\n", [], "[nosuch]"),
        ("[federated]\nlearning_rate = 0.1\n", [], "federated.learning_rate"),
        ("[federated]\nrounds = 'ten'\n", [], "federated.rounds"),
        ("[federated]\nrounds = 2.5\n", [], "federated.rounds"),
        ("[data]\ndownload = 1\n", [], "data.download"),
        ("[federated]\nlr = -0.1\n", [], "federated.lr"),
        ("[data]\nimb_factor = 0.0\n", [], "data.imb_factor"),
        ("[data]\nimb_factor = 1.5\n", [], "data.imb_factor"),
        ("[federated]\nnum_clients = 5\nclients_per_round = 6\n", [], "clients_per_round"),
        ("[federated]\nstrategy = 'fedsgd'\n", [], "federated.strategy"),
        ("", ["federated.rounds=abc"], "federated.rounds"),
        ("", ["federated.nosuch=1"], "federated.nosuch"),
        ("", ["data.download=maybe"], "data.download"),
        ("", ["justakey"], "section.key=value"),
    ],
)
def test_bad_config_is_one_message_naming_the_key(tmp_path, text, overrides, named):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        load_config(path, overrides)


def test_cli_exits_2_without_traceback(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[federated]\nlr = -1.0\n")
    assert main(["federate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "federated.lr" in err and "> 0" in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_cli_missing_config_file(tmp_path, capsys):
    assert main(["federate", str(tmp_path / "nope.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_resume_differences_ignore_what_does_not_change_results():
    base = Config().to_dict()
    more_rounds = Config().to_dict()
    more_rounds["federated"]["rounds"] = 99
    more_rounds["eval"]["every"] = 3
    assert resume_differences(base, more_rounds) == []
    other_lr = Config().to_dict()
    other_lr["federated"]["lr"] = 0.5
    assert resume_differences(base, other_lr) == ["federated.lr: 0.1 -> 0.5"]


def test_resume_differences_ignore_sections_the_strategy_does_not_read():
    base = Config().to_dict()  # fedavg
    clip_model = Config().to_dict()
    clip_model["clip2fl"]["model"] = "local-dir:clip"
    clip_model["creff"]["crt_epochs"] = 5
    assert resume_differences(base, clip_model) == []
    for strategy, expected in (
        ("creff", ["creff.crt_epochs: 300 -> 5"]),
        ("clip2fl", ["creff.crt_epochs: 300 -> 5", "clip2fl.model: '' -> 'local-dir:clip'"]),
    ):
        saved = Config().to_dict()
        current = dict(clip_model, federated=dict(clip_model["federated"], strategy=strategy))
        saved["federated"]["strategy"] = strategy
        assert resume_differences(saved, current) == expected

    # [align] is not read while alignment is off, before and after.
    align_changed = Config().to_dict()
    align_changed["align"]["steps"] = 7
    assert resume_differences(base, align_changed) == []
    align_changed["align"]["every"] = 1
    assert resume_differences(base, align_changed) == ["align.every: 0 -> 1", "align.steps: 20 -> 7"]


def test_defaults_are_the_released_cifar10_lt_setting_of_creff_and_clip2fl():
    """A config that omits a key runs the experiment the papers (and their released options.py) describe."""
    from mllmfl_dist.config import AlignConfig, FederatedConfig
    from mllmfl_dist.fl.strategies.clip2fl import Clip2flConfig
    from mllmfl_dist.fl.strategies.creff import CreffConfig

    fed = FederatedConfig()
    assert (fed.num_clients, fed.clients_per_round, fed.rounds, fed.local_epochs, fed.batch_size, fed.lr) == (
        20,
        8,
        200,
        10,
        32,
        0.1,
    )
    assert fed.server_momentum == 0.97 and fed.prox_mu == 0.01
    assert Clip2flConfig().contrast_alpha == 0.001
    assert CreffConfig().dsa_strategy == "color_crop_cutout_flip_scale_rotate"
    assert AlignConfig().temperature == 1.0  # the paper's CE + beta * KL(q || p)


def test_the_readme_config_table_names_every_federated_setting_a_config_changes():
    """The README's config table says which [federated] settings each shipped config changes."""
    from mllmfl_dist.config import Config, flat_items

    defaults = flat_items(Config().to_dict())
    rows = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `configs/")]
    for path in sorted((REPO / "configs").glob("*.toml")):
        row = next((r for r in rows if f"`configs/{path.name}`" in r or f"`{path.name}`" in r), None)
        assert row is not None, f"README's config table has no row for {path.name}"
        changed = {
            k: v
            for k, v in flat_items(load_config(path).to_dict()).items()
            if k.startswith("federated.") and v != defaults[k]
        }
        cell = row.split("|")[3]
        for key, value in changed.items():
            assert f"{key.split('.')[1]} {value}" in cell, f"{path.name}: {key} = {value} missing from the README"
        if not changed:
            assert "none" in cell, path.name


def test_a_resume_compares_keys_the_saved_config_predates_with_the_behaviour_it_had():
    saved = Config().to_dict()
    del saved["data"]["val_per_class"], saved["data"]["train_fraction"]  # a config saved before the keys existed
    assert resume_differences(saved, Config().to_dict()) == []  # the defaults are what it had
    carved = Config().to_dict()
    carved["data"]["val_per_class"] = 100
    assert resume_differences(saved, carved) == ["data.val_per_class: 0 -> 100"]


def test_commands_that_only_read_a_run_directory_do_not_need_one_that_can_be_made(tmp_path):
    in_the_way = tmp_path / "file"
    in_the_way.write_text("not a folder")
    config = tmp_path / "c.toml"
    config.write_text(f'[run]\nroot = "{in_the_way}"\n')
    with pytest.raises(ConfigError, match="file"):
        load_config(config)
    assert load_config(config, check_run_dir=False).run.root == str(in_the_way)


def test_set_values_are_checked_and_expanded_as_a_config_file_would_be():
    from mllmfl_dist.config.loader import parse_override

    assert parse_override("clip2fl.model=local-dir:~/clip")[1] == f"local-dir:{Path.home()}/clip"
    with pytest.raises(ConfigError, match="64-bit"):
        parse_override(f"federated.rounds={2**70}")
