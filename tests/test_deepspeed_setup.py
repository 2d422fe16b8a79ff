"""DeepSpeed for DWP: a user's DeepSpeed JSON merged under our keys, and a start-up that compiles nothing."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from mllmfl_dist.config import ConfigError, DeepSpeedConfig, PretrainConfig
from mllmfl_dist.stages.deepspeed_setup import deepspeed_config, merge_under

REPO = Path(__file__).resolve().parents[1]


def pretrain_config(**deepspeed) -> PretrainConfig:
    return PretrainConfig(steps=10, micro_batch_size=4, deepspeed=replace(DeepSpeedConfig(), **deepspeed))


def test_merge_under_lets_ours_win_and_keeps_the_users_other_keys() -> None:
    user = {
        "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}},
        "train_batch_size": 99,
        "fp16": {"enabled": True, "loss_scale_window": 100},
        "aio": {"block_size": 1048576},
    }
    ours = {"zero_optimization": {"stage": 2}, "train_batch_size": 8, "fp16": {"enabled": False}}
    merged, replaced = merge_under(user, ours)
    assert merged == {
        "zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}},
        "train_batch_size": 8,
        "fp16": {"enabled": False, "loss_scale_window": 100},
        "aio": {"block_size": 1048576},
    }
    assert sorted(replaced) == ["fp16.enabled", "train_batch_size", "zero_optimization.stage"]
    assert user["zero_optimization"]["stage"] == 3  # the inputs are left alone


def test_config_file_adds_offload_and_zero3_options_under_our_keys(tmp_path, caplog) -> None:
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {
                "zero_optimization": {
                    "stage": 1,
                    "offload_optimizer": {"device": "cpu", "pin_memory": True},
                    "stage3_max_live_parameters": 100000000,
                },
                "gradient_clipping": 5.0,  # ours is 1.0: ours wins, with a warning
                "gradient_accumulation_steps": 2,  # the same as ours: no warning
                "train_micro_batch_size_per_gpu": 16,  # pretrain.micro_batch_size (4) wins: a [pretrain] key
            }
        )
    )
    pcfg = pretrain_config(zero_stage=3, config_file=str(path), gradient_accumulation_steps=2)
    with caplog.at_level(logging.WARNING):
        config = deepspeed_config(pcfg, 2)
    assert config["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "stage3_max_live_parameters": 100000000,
    }
    assert config["gradient_clipping"] == 1.0 and config["train_batch_size"] == 4 * 2 * 2
    assert config == {
        **deepspeed_config(replace(pcfg, deepspeed=replace(pcfg.deepspeed, config_file="")), 2),
        "zero_optimization": config["zero_optimization"],
    }
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "gradient_clipping" in warned and "zero_optimization.stage" in warned
    assert "train_micro_batch_size_per_gpu" in warned and "[pretrain] / [pretrain.deepspeed]" in warned
    assert "gradient_accumulation_steps" not in warned


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "no such file"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"zero_optimization": {"reduce_bucket_size": "auto"}}', 'zero_optimization.reduce_bucket_size = "auto"'),
    ],
)
def test_a_bad_config_file_is_one_config_error(tmp_path, content, message) -> None:
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match="pretrain.deepspeed.config_file") as err:
        deepspeed_config(pretrain_config(config_file=str(path)), 1)
    assert message in str(err.value)


START = textwrap.dedent("""
    import json, sys, time
    import torch, torch.distributed as td
    from mllmfl_dist.config import DeepSpeedConfig, PretrainConfig
    from mllmfl_dist.stages.deepspeed_setup import deepspeed_config, prepare_deepspeed
    td.init_process_group("gloo", store=td.HashStore(), rank=0, world_size=1)
    prepare_deepspeed(torch.device("cpu"), sys.argv[1])
    import deepspeed
    pcfg = PretrainConfig(micro_batch_size=2, deepspeed=DeepSpeedConfig(zero_stage=1, config_file=sys.argv[2]))
    model = torch.nn.Linear(8, 2)
    began = time.perf_counter()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                      config=deepspeed_config(pcfg, 1, torch_optimizer=True))
    loss = engine(torch.randn(2, 8)).square().mean()
    engine.backward(loss)
    engine.step()
    print(json.dumps({"seconds": time.perf_counter() - began, "steps": engine.global_steps,
                      "shm_op": deepspeed.comm.comm.cdb.shm_comm_op is not None,
                      "reduce_bucket_size": engine.zero_reduce_bucket_size()}))
""")


def test_deepspeed_starts_without_compiling_and_reads_the_users_file(tmp_path) -> None:
    """In a fresh torch-extensions folder (what a new clone sees), deepspeed.initialize with cpu_comm = "gloo"
    builds nothing, and ZeRO takes the user's bucket size from the config file."""
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 12345}}))
    extensions = tmp_path / "torch_extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "PYTHONPATH": str(REPO), "LOCAL_RANK": "0"}
    done = subprocess.run(
        [sys.executable, "-c", START, "gloo", str(user)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["steps"] == 1 and result["reduce_bucket_size"] == 12345
    assert not result["shm_op"]
    assert not list(extensions.glob("**/deepspeed_shm_comm*")), "DeepSpeed compiled its shm op"
    assert "Setting accelerator to CPU" not in done.stderr  # DS_ACCELERATOR=cpu, no guess and warning
    assert "before it has started" not in done.stdout + done.stderr  # WarmupCosineLR's start-up notice
