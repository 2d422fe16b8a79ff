"""The benchmark's config for timing against an older commit (benchmarks/cross_device.py): the shipped
configs less stage 1, so a key added to [pretrain] since that commit cannot make its schema refuse the run
(it did: `pretrain.global_batch_size`), while everything `federate` reads stays as configured."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mllmfl_dist.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from cross_device import federate_only_config  # noqa: E402


@pytest.mark.parametrize("name", ["fmnist_lt.toml", "fmnist_lt_dir01.toml", "default.toml", "cifar10_lt.toml"])
def test_federate_only_config_drops_stage_1_and_keeps_what_federate_reads(name, tmp_path):
    config = REPO / "configs" / name
    full = load_config(config)
    trimmed = load_config(federate_only_config(config, tmp_path / name))
    stage1 = ("annotate", "pretrain")
    assert {k: v for k, v in trimmed.to_dict().items() if k not in stage1} == {
        k: v for k, v in full.to_dict().items() if k not in stage1
    }
    assert trimmed.pretrain == type(full.pretrain)() and trimmed.annotate == type(full.annotate)()


def test_a_key_an_older_schema_lacks_is_gone_from_the_trimmed_config(tmp_path):
    config = tmp_path / "new.toml"
    config.write_text(
        "[federated]\nrounds = 2\n\n[pretrain]  # stage 1\nsteps = 5\nnot_yet_a_key = 1\n\n"
        "[pretrain.deepspeed]\nlr = 0.1\n\n[eval]\nevery = 1\n"
    )
    with pytest.raises(ConfigError, match="not_yet_a_key"):
        load_config(config)
    trimmed = load_config(federate_only_config(config, tmp_path / "trimmed.toml"))
    assert trimmed.federated.rounds == 2 and trimmed.eval.every == 1 and trimmed.pretrain.steps != 5


def test_a_stage_1_table_line_filtering_would_misread_is_refused_not_timed(tmp_path):
    config = tmp_path / "prompt.toml"
    # a prompt line that looks like a table header would end [annotate] mid-string
    config.write_text(
        '[federated]\nrounds = 2\n\n[annotate]\nprompt = """\n[INST]\ndescribe\n"""\n\n[eval]\nevery = 1\n'
    )
    with pytest.raises(ValueError, match="stage-1 tables"):
        federate_only_config(config, tmp_path / "out.toml")
