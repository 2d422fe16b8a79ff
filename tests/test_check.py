"""``check CONFIG`` (commands/check.py): the paper's config on a machine without its weights and data, a tiny
config whose models exist, a Hugging Face cache tree found and read, and ``run`` refusing at once with the same
lines. The estimates' parameter counts are compared with the real modules'."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from test_cli_startup import REPO, imported_modules

from mllmfl_dist.__main__ import main
from mllmfl_dist.commands import check, check_footprint
from mllmfl_dist.commands.check_inputs import Findings
from mllmfl_dist.config import load_config
from mllmfl_dist.mllm import model_files

LLAVA = "llava-hf/llava-1.5-7b-hf"


def missing_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("missing: ")]


def test_paper_config_without_weights_or_data_lists_each_missing_thing_and_loads_no_model_library(tmp_path):
    env_cache = tmp_path / "hf"
    env_cache.mkdir()
    os.environ["HF_HUB_CACHE"] = str(env_cache)  # a cache of our own, empty, whatever this machine holds
    try:
        done, modules = imported_modules(
            "check",
            "configs/cifar10_lt.toml",
            "--set",
            f"run.root={tmp_path}/runs",
            "--set",
            f"data.root={tmp_path}/cifar",
        )
    finally:
        del os.environ["HF_HUB_CACHE"]
    assert done.returncode == 2, done.stderr[-2000:]
    loaded = sorted(m for m in modules if m.split(".")[0] in ("transformers", "deepspeed", "open_clip"))
    assert not loaded, f"check imported {loaded[:10]}"
    # the table: every group, and the model's one row naming the three settings that load it
    for group in ("model", "data", "shards", "world", "memory", "run dir"):
        assert any(line.startswith(group) for line in done.stdout.splitlines()), done.stdout
    lines = missing_lines(done.stderr)
    assert len(lines) == 4, done.stderr  # the LLaVA weights, CIFAR-10, the web shards, the alignment pool
    assert sum(LLAVA in line and "huggingface-cli download" in line for line in lines) == 1
    assert sum("CIFAR-10" in line for line in lines) == 1
    assert sum("annotate.shards" in line for line in lines) == 1
    assert sum("align.pool_shards" in line for line in lines) == 1
    assert not (tmp_path / "runs").exists()  # check writes nothing


def write_fake_hub_model(cache, repo_id: str, tensors: dict, config: dict, shards: int = 1) -> None:
    """A hub model as huggingface_hub caches it: refs/main, snapshots/<rev>/config.json and safetensors files
    (with an index when ``shards`` > 1)."""
    from safetensors.numpy import save_file

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    (snapshot / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(snapshot / "model.safetensors"))
        return
    weight_map = {}
    for index in range(shards):
        part = {name: tensors[name] for name in names[index::shards]}
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(snapshot / file))
        weight_map.update({name: file for name in part})
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_a_hub_model_in_a_fake_cache_is_found_and_its_parameters_counted(tmp_path):
    tensors = {
        "a.weight": np.zeros((10, 20), np.float16),
        "b.bias": np.zeros(5, np.float16),
        "c.weight": np.zeros((3, 4), np.float16),
    }
    config = {
        "model_type": "llava",
        "text_config": {"hidden_size": 64, "num_hidden_layers": 2},
        "vision_config": {"hidden_size": 32, "image_size": 336, "patch_size": 14},
    }
    write_fake_hub_model(tmp_path, "org/one", tensors, config)
    write_fake_hub_model(tmp_path, "org/sharded", tensors, config, shards=2)
    for repo in ("org/one", "org/sharded"):
        info = model_files.find_hf_model(repo, cache=tmp_path)
        assert info.found and info.problem is None, info.problem
        assert info.params == 200 + 5 + 12 and info.dtypes == ["F16"]
        assert info.where == str(tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / "0123abcd")
    geometry = check_footprint.LlavaGeometry.from_config(config)
    assert geometry.image_tokens == 576 and geometry.layers == 2  # 24 x 24 patches, CLS dropped ("default")
    # HF_HOME/hub is where huggingface_hub looks without HF_HUB_CACHE
    assert model_files.hf_cache_dir({"HF_HOME": str(tmp_path.parent)}) == tmp_path.parent / "hub"
    # an interrupted download: one shard of the index gone
    shard = next((tmp_path / "models--org--sharded" / "snapshots" / "0123abcd").glob("model-00002-*"))
    shard.unlink()
    broken = model_files.find_hf_model("org/sharded", cache=tmp_path)
    assert not broken.found and "1 of 2 weight files missing" in broken.problem
    assert not model_files.find_hf_model("org/absent", cache=tmp_path).found


@pytest.fixture
def tiny_run_args(tiny_models, tmp_path):
    return [
        "configs/tiny_mllm.toml",
        "--set",
        f"run.root={tmp_path}",
        "--set",
        f"annotate.model={tiny_models['llava']}",
        "--set",
        "align.every=1",
        "--set",
        "align.teacher=clip",
        "--set",
        f"align.teacher_model=local-dir:{tiny_models['clip']}",
        "--set",
        "align.pool_shards=shards/fmnist_align/*.tar.gz",
    ]


def test_tiny_config_with_local_models_passes(tiny_run_args, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["check", *tiny_run_args]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "annotate.model, pretrain.model (= annotate.model)" in out and " params, f32" in out
    assert "align.teacher_model (clip): local-dir:" in out
    assert "MISSING" not in out and "memory   pretrain" in out


def test_run_refuses_a_missing_model_at_once_with_the_check_line(tiny_run_args, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    args = [*tiny_run_args, "--set", f"annotate.model={tmp_path}/no-such-llava"]
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert f"missing: model '{tmp_path}/no-such-llava': no directory" in err
    assert main(["check", *args]) == 2
    assert f"missing: model '{tmp_path}/no-such-llava': no directory" in capsys.readouterr().err
    assert not (tmp_path / "tiny_mllm").exists()  # refused before anything was written


def test_world_as_launched_refuses_more_nccl_ranks_than_gpus():
    cfg = load_config(REPO / "configs" / "smoke.toml", check_run_dir=False)
    env = {"RANK": "0", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}
    world = check.planned_world(cfg, "configs/smoke.toml", gpus=4, env=env)
    assert (world.nodes, world.per_node, world.backend, world.how) == (2, 8, "nccl", "launched")
    out = Findings()
    check.check_world(world, out)
    assert out.missing and "8 ranks on this node but 4 visible GPU(s)" in out.missing[0]
    alone = check.planned_world(cfg, "configs/smoke.toml", gpus=0, env={})
    assert (alone.per_node, alone.backend, alone.how) == (3, "gloo", "the config's launch line")


def test_dwp_batch_row_refuses_a_world_the_global_batch_does_not_split_over():
    # fmnist_lt pins pretrain.global_batch_size = 24 with micro-batches of 8: 1 or 3 ranks, not 2 or 4.
    cfg = load_config(REPO / "configs" / "fmnist_lt.toml", check_run_dir=False)
    stages = ["annotate", "pretrain", "federate"]
    for ranks, steps in ((1, 3), (3, 1)):
        out = Findings()
        check.check_dwp_batch(cfg, stages, check.World(1, ranks, 0, None, "gloo", "given"), out)
        assert not out.missing
        assert out.rows[0].detail.startswith(f"24 samples = micro-batch 8 x {steps} accumulated x {ranks} rank(s)")
    for ranks in (2, 4):
        out = Findings()
        check.check_dwp_batch(cfg, stages, check.World(1, ranks, 0, None, "gloo", "given"), out)
        assert len(out.missing) == 1 and "run DWP on 1, 3 processes" in out.missing[0]
        assert out.rows[0].status == "MISSING"
    out = Findings()  # federate alone plans no DWP: no row
    check.check_dwp_batch(cfg, ["federate"], check.World(1, 2, 0, None, "gloo", "given"), out)
    assert not out.rows


@pytest.mark.parametrize("arch,scale,channels", [("resnet8", 4, 3), ("resnet8", 1, 1), ("resnet50", 1, 3)])
def test_estimated_parameter_counts_are_the_models_own(arch, scale, channels):
    from mllmfl_dist.stages.pretrain.dwp import TokenAdapter
    from mllmfl_dist.fl.models import build_model

    cfg = load_config(
        REPO / "configs" / "smoke.toml", [f"model.arch={arch}", f"model.width_scale={scale}"], check_run_dir=False
    )
    params, backbone, map_channels, _ = check_footprint.fl_model_size(cfg, 10, channels, 32)
    model = build_model(arch, channels, 10, scale)
    assert params == sum(p.numel() for p in model.parameters())
    assert backbone == sum(v.numel() for k, v in model.named_parameters() if not k.startswith("classifier."))
    geometry = check_footprint.LlavaGeometry(2, 64, 4, 64, 576, 1024)
    adapter = TokenAdapter(map_channels, 576, 24, 24, 1024)
    assert check_footprint.adapter_params(map_channels, geometry) == sum(p.numel() for p in adapter.parameters())


def test_zero_stages_split_the_state_as_the_paper_counts():
    # ZeRO paper, fig. 1: 7.5 B parameters, Adam, mixed precision, 64 ranks: 120 / 31.4 / 16.6 / 1.9 GB
    per_rank = [check_footprint.zero_bytes(7_500_000_000, "bf16", "AdamW", stage, 64) / 1e9 for stage in range(4)]
    assert [round(v, 1) for v in per_rank] == [120.0, 31.4, 16.6, 1.9]


def test_open_clip_table_read_without_importing_open_clip_matches_open_clip():
    code = (
        "import sys; from mllmfl_dist.mllm.model_files import open_clip_pretrained as p; "
        "print(p('ViT-B-32', 'openai')['hf_hub']); print('open_clip' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    import open_clip

    assert done.stdout.split() == [open_clip.get_pretrained_cfg("ViT-B-32", "openai")["hf_hub"], "False"]


def test_the_federate_estimate_counts_the_client_state_slots_the_trainer_allocates():
    """SCAFFOLD's per-client state rides in the round's all_reduce (float64) and broadcast (float32, kept as a copy
    by every rank), and rank 0's store holds entries: the estimate grows by exactly those bytes over fedavg's."""
    from test_client_state import smoke_trainer

    sets = ["federated.strategy=scaffold", "federated.local_epochs=1"]
    cfg = load_config(REPO / "configs" / "smoke.toml", sets, check_run_dir=False)
    trainer = smoke_trainer(*sets)
    reduce = {k: s for k, s in zip(trainer.round_layout.keys, trainer.round_layout.shapes)}
    broadcast = {k: s for k, s in zip(trainer.broadcast_layout.keys, trainer.broadcast_layout.shapes)}
    slots = sum(
        int(np.prod(reduce[k])) * 8 + int(np.prod(broadcast[k])) * 4 * 2
        for k in ("client_states", "client_state_present")
    )
    width = trainer.client_state_layout.numel
    expected = slots + min(int(cfg.federated.client_state_mb * 2**20), cfg.federated.num_clients * width * 4)

    shape = check_footprint.data_shape(cfg)
    assert check_footprint.client_state_width(cfg, *shape) == width
    fl, _, _, activations = check_footprint.fl_model_size(cfg, *shape)
    fedavg_total = check_footprint.federate_memory(cfg, fl, activations, 1)
    fedavg = load_config(REPO / "configs" / "smoke.toml", ["federated.local_epochs=1"], check_run_dir=False)
    assert check_footprint.client_state_width(fedavg, *shape) == 0

    def too_big(config, have: int) -> bool:
        out = Findings()
        check.check_memory(config, ["federate"], check.World(1, 1, 1, have, "nccl", "given"), out)
        return bool(out.too_big)

    assert not too_big(fedavg, fedavg_total)
    assert too_big(cfg, fedavg_total + expected - 1) and not too_big(cfg, fedavg_total + expected)


def test_client_state_slots_count_against_the_round_buffers_limit(monkeypatch):
    """A limit SCAFFOLD's uploads fit but its K x width state slots do not is refused at once, naming them."""
    from test_client_state import smoke_trainer

    from mllmfl_dist.config import ConfigError
    from mllmfl_dist.fl import round_buffers

    uploads = smoke_trainer("federated.strategy=scaffold").upload_layout.numel * 8
    monkeypatch.setattr(round_buffers, "MAX_UPLOAD_BYTES", uploads + 64)
    smoke_trainer("federated.strategy=fednova")  # uploads as wide (and two counts), no client state: fits
    with pytest.raises(ConfigError, match=r"'scaffold'.*client state 6 x \d+ float64"):
        smoke_trainer("federated.strategy=scaffold")
