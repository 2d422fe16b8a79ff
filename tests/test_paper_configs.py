"""The paper's three configs (configs/cifar10_lt.toml, cifar100_lt.toml, imagenet_lt.toml) end to end: ``run``
under torchrun with 3 processes on the shape-faithful miniatures (llava-1.5-7b-hf's geometry) and data files in
the real formats, every size scaled down, every code path of the config kept (annotation, DWP under DeepSpeed at
the config's ZeRO stage and bf16, the creff partition, ResNet-8 x4 / ResNet-50, alignment with the LLaVA
teacher, the report). The slow part of the suite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launchers import clean_env, sets
from paper_data import MD5_ENV, write_cifar, write_md5_table, write_pool_shard, write_web_shard
from test_imagenet_lt import write_imagenet_lt_tree

from mllmfl_dist.config import load_config
from mllmfl_dist.data.longtail import longtail_counts
from mllmfl_dist.standins.miniature import IMAGE_TOKEN_ID, LLAVA_IMAGE_SIZE

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "tests" / "cifar_md5_main.py"
SYNSETS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475")
POOL_CLASSES = {"cifar10_lt": 10, "cifar100_lt": 2, "imagenet_lt": 5}  # labeled pool images, one per class


@pytest.fixture(scope="session")
def paper_data(tmp_path_factory) -> dict:
    """One data.root per config, the web shards to caption and the labeled alignment pools."""
    base = tmp_path_factory.mktemp("paper_data")
    cifar = base / "cifar"
    # The configs keep n_max * 0.01 ** (c / (C - 1)) images of class c: 100 of the head class leaves one of the tail.
    tables = [
        write_cifar(cifar, name, longtail_counts(100, classes, 0.01), 1)
        for name, classes in (("cifar10", 10), ("cifar100", 100))
    ]
    md5 = write_md5_table(base / "md5.json", *tables)
    imagenet = write_imagenet_lt_tree(base / "imagenet", SYNSETS, (8, 5, 3, 2, 2), 2)
    for i in range(3):  # one shard per rank: annotate.ranks = "all" gives whole shards to ranks
        write_web_shard(base / "web" / f"shard-{i:06d}.tar", 4, seed=i)
    # The LLaVA teacher scores every class name for each pool image (100 sequences of ~590 tokens per image on
    # CIFAR-100): two images there keep that path at a bearable cost on a CPU.
    pools = {n: write_pool_shard(base / f"align{n}" / "align-000000.tar", list(range(n))) for n in (2, 5, 10)}
    return {"cifar": cifar, "imagenet": imagenet, "md5": md5, "web": str(base / "web" / "shard-*.tar"), "pools": pools}


def scaled_down(config: str, root: Path, data: dict, llava: Path) -> list[str]:
    """``--set`` overrides: the miniatures, the generated files, and every count small; nothing that picks a
    code path (source, partition, arch, ZeRO stage, precision, dtype, teacher, strategy) changes."""
    imagenet = config == "imagenet_lt"
    return [
        f"run.root={root}",
        f"data.root={data['imagenet'] if imagenet else data['cifar']}",
        f"annotate.model={llava}",
        f"annotate.shards={data['web']}",
        "annotate.batch_size=3",
        "annotate.max_new_tokens=4",
        "pretrain.steps=2",
        "pretrain.micro_batch_size=2",
        "pretrain.heldout=2",
        "pretrain.checkpoint_every=1",
        "pretrain.deepspeed.warmup_steps=1",
        "federated.rounds=1",
        "federated.num_clients=4",
        "federated.clients_per_round=3",
        "federated.local_epochs=1",
        "federated.batch_size=8",
        "eval.every=1",
        "checkpoint.every=1",
        f"align.pool_shards={data['pools'][POOL_CLASSES[config]]}",
        "align.per_class=1",
        "align.steps=2",
        f"align.teacher_model={llava}",
        "log.progress=false",
        "log.tensorboard=false",
    ]


# cifar10_lt runs in every suite; the other two (about 5 min each on the 2-core VM) are marked slow: CI runs
# them after the suite (.ci/run: `launch/test.sh -m slow`), the README's test command leaves them out.
@pytest.mark.parametrize(
    "config",
    [
        "cifar10_lt",
        pytest.param("cifar100_lt", marks=pytest.mark.slow),
        pytest.param("imagenet_lt", marks=pytest.mark.slow),
    ],
)
def test_paper_config_runs_end_to_end_on_the_miniatures(config, tmp_path, miniatures, paper_data):
    path = REPO / "configs" / f"{config}.toml"
    overrides = scaled_down(config, tmp_path, paper_data, miniatures["llava"])
    cfg = load_config(path, overrides)
    real = load_config(path)
    assert (
        cfg.pretrain.deepspeed.zero_stage,
        cfg.pretrain.deepspeed.precision,
        cfg.partition.method,
        cfg.model.arch,
        cfg.align.teacher,
        cfg.annotate.dtype,
    ) == (
        real.pretrain.deepspeed.zero_stage,
        real.pretrain.deepspeed.precision,
        real.partition.method,
        real.model.arch,
        real.align.teacher,
        real.annotate.dtype,
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=3",
        str(RUNNER),
        "run",
        str(path),
        *sets(*overrides),
    ]
    done = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(**{MD5_ENV: str(paper_data["md5"])}),
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-6000:])

    run_dir = cfg.run_dir
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    assert summary["annotate"]["captions_out"] == 12
    metrics = json.loads((run_dir / "pretrain" / "metrics.json").read_text())
    assert metrics["deepspeed"]["zero_stage"] == real.pretrain.deepspeed.zero_stage
    assert metrics["deepspeed"]["precision"] == "bf16" and metrics["data_parallel_ranks"] == 3
    adapter = torch.load(run_dir / "pretrain" / "adapter.pt", weights_only=True)
    grid = (LLAVA_IMAGE_SIZE // 14) ** 2
    assert adapter["pos"].shape[1] == grid == 576  # ResNet's feature map onto llava-1.5's 24 x 24 patch grid
    final = torch.load(run_dir / "federated" / "model_final.pt", weights_only=True)
    classes = {"cifar10_lt": 10, "cifar100_lt": 100, "imagenet_lt": len(SYNSETS)}[config]
    assert final["classifier.weight"].shape[0] == classes
    assert any(".conv3." in k for k in final) == (config == "imagenet_lt")  # ResNet-50's bottlenecks
    assert summary["federated"]["round"] == 1 and "before_align" in summary["federated"]
    assert list((run_dir / "align").glob("teacher-llava-*.pt")), "the LLaVA teacher scored the pool"
    assert (run_dir / "report" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert IMAGE_TOKEN_ID == 32000
