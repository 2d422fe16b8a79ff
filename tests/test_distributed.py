"""Real gloo process groups (torchrun, 2-3 processes) against single-process computations."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from mllmfl_dist.config import load_config
from reference_loop import reference_rounds

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.toml"
# Augmentation on (crop and flip) so that seeding by (seed, round, client) is exercised, and local
# momentum so that optimizer state inside a client matters too.
COMMON = [
    "dist.threads=1",
    "data.hflip=true",
    "federated.momentum=0.5",
    "federated.num_clients=12",
    "federated.clients_per_round=5",
    "log.progress=false",
    "log.tensorboard=false",
]


def launch(nproc: int, root: Path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    sets = [f"run.root={root}", f"run.name={name}", *COMMON, *overrides]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "mllmfl_dist",
        "federate",
        str(SMOKE),
        *[a for s in sets for a in ("--set", s)],
    ]
    return subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def federate(nproc: int, root: Path, name: str, *overrides: str) -> Path:
    result = launch(nproc, root, name, *overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root / name / "federated"


def final_model(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model_final.pt", weights_only=True)


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_first_round_on_three_processes_equals_single_process_loop(tmp_path):
    out = federate(3, tmp_path, "three", "federated.rounds=1")
    cfg = load_config(SMOKE, [*COMMON, "federated.rounds=1"])
    expected, _ = reference_rounds(cfg, rounds=1, threads=1)
    got = final_model(out)
    start = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert max_abs_difference(got, expected) <= 1e-6
    # The round really moved the model (the comparison above is not between two untouched inits).
    from mllmfl_dist.stages.inputs import build_data, build_fl_model

    init = build_fl_model(cfg.model, build_data(cfg), cfg.run.seed).state_dict()
    assert max_abs_difference(got, init) > 1e-3
    assert max_abs_difference(got, start) == 0.0


def test_two_and_three_processes_end_with_the_same_model(tmp_path):
    two = federate(2, tmp_path, "two", "federated.rounds=3", "federated.strategy=fedavgm")
    three = federate(3, tmp_path, "three", "federated.rounds=3", "federated.strategy=fedavgm")
    assert max_abs_difference(final_model(two), final_model(three)) <= 1e-5


def test_resume_after_round_two_equals_a_straight_run(tmp_path):
    straight = federate(3, tmp_path, "straight", "federated.rounds=4", "federated.strategy=fedavgm")
    federate(3, tmp_path, "resumed", "federated.rounds=2", "federated.strategy=fedavgm")
    resumed = federate(3, tmp_path, "resumed", "federated.rounds=4", "federated.strategy=fedavgm")
    assert max_abs_difference(final_model(straight), final_model(resumed)) <= 1e-6
    rounds = [line for line in (resumed / "rounds.jsonl").read_text().splitlines() if line]
    assert len(rounds) == 4  # rounds 1-2 from the first run, 3-4 from the resumed one; none twice
    metrics = (resumed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in metrics] == [1, 2, 3, 4]

    # Resuming with another learning rate is refused on every rank (rank 0 alone reads the checkpoint),
    # so the job ends promptly with the reason instead of ranks 1-2 waiting on the control group.
    saved = (resumed / "checkpoint.pt").read_bytes()
    refused = launch(3, tmp_path, "resumed", "federated.rounds=5", "federated.strategy=fedavgm", "federated.lr=0.5")
    assert refused.returncode != 0
    printed = [line for line in refused.stderr.splitlines() if line.startswith("mllmfl_dist: error:")]
    assert len(printed) == 1 and "federated.lr: 0.05 -> 0.5" in printed[0], refused.stderr[-3000:]  # once
    assert "traceback : mllmfl_dist: error:" in refused.stderr  # and in torchrun's failure block
    assert (resumed / "checkpoint.pt").read_bytes() == saved


def test_finetuning_starts_from_the_pretrained_backbone_on_every_rank(tmp_path):
    from mllmfl_dist.stages.inputs import build_data, build_fl_model

    cfg = load_config(SMOKE, COMMON)
    donor = build_fl_model(cfg.model, build_data(cfg), cfg.run.seed)
    with torch.no_grad():
        for p in donor.parameters():
            p.normal_()
    backbone = tmp_path / "backbone.pt"
    torch.save(donor.state_dict(), backbone)  # its classifier entries must be ignored: the head is new
    # One round with a tiny learning rate: the model after it is the backbone plus small steps.
    out = federate(
        3,
        tmp_path,
        "from_backbone",
        "federated.rounds=1",
        "federated.lr=1e-6",
        "federated.momentum=0.0",
        f"model.pretrained_backbone={backbone}",
    )
    got = final_model(out)
    for key, value in donor.backbone_state_dict().items():
        if value.is_floating_point() and "running" not in key:
            assert (got[key] - value).abs().max().item() < 1e-3, key
    fresh = build_fl_model(cfg.model, build_data(cfg), cfg.run.seed).state_dict()
    assert max_abs_difference({"w": got["classifier.weight"]}, {"w": fresh["classifier.weight"]}) < 1e-3

    missing = launch(
        3, tmp_path, "no_backbone", "federated.rounds=1", f"model.pretrained_backbone={tmp_path / 'nope.pt'}"
    )
    printed = [line for line in missing.stderr.splitlines() if line.startswith("mllmfl_dist: error:")]
    assert missing.returncode != 0 and len(printed) == 1 and "model.pretrained_backbone" in printed[0]


def test_creff_class_gradients_from_three_processes_equal_those_of_one_process(tmp_path):
    """The per-class classifier gradients travel in the round's all_reduce. After one round with one
    matching step, the federated features of 3 gloo processes equal those of 1 process, and both equal one
    SGD step from the gradients computed here, client by client, in this process."""
    from mllmfl_dist.fl import federated_features as ff
    from mllmfl_dist.fl.client import LocalTraining
    from mllmfl_dist.core.seeds import TAG_CLIENT_UPLOAD, TAG_CREFF_FEATURES, derive_seed
    from mllmfl_dist.fl.sampling import sample_clients
    from mllmfl_dist.fl.strategies import build_strategy
    from mllmfl_dist.stages.inputs import build_data, build_fl_model

    sets = [
        "federated.strategy=creff",
        "federated.rounds=1",
        "creff.match_epochs=1",
        "creff.crt_epochs=2",
        "creff.batches_per_class=2",
        "creff.batch_size=8",
        "creff.gradient_mean=samples",
    ]
    three = torch.load(federate(3, tmp_path, "three", *sets) / "checkpoint.pt", weights_only=True)
    one = torch.load(federate(1, tmp_path, "one", *sets) / "checkpoint.pt", weights_only=True)
    features_three = three["strategy"]["features"]
    features_one = one["strategy"]["features"]
    assert (features_three - features_one).abs().max().item() <= 1e-6

    cfg = load_config(SMOKE, [*COMMON, *sets])
    data = build_data(cfg)
    model = build_fl_model(cfg.model, data, cfg.run.seed)
    strategy = build_strategy(cfg)
    spec = LocalTraining.of(cfg.federated, cfg.data, data.mean, data.std)
    num_classes, dim = data.num_classes, model.feature_dim
    assert strategy.upload_shapes(model) == {
        "class_gradients": (num_classes, num_classes, dim + 1),
        "class_weights": (num_classes,),
    }
    sums = {"class_gradients": 0, "class_weights": 0}
    clients = sample_clients(cfg.run.seed, 1, cfg.federated.num_clients, cfg.federated.clients_per_round)
    for cid in clients:
        generator = torch.Generator().manual_seed(derive_seed(cfg.run.seed, TAG_CLIENT_UPLOAD, 1, cid))
        upload = strategy.client_upload(model, *data.client(cid), spec, generator, "cpu")
        sums = {name: sums[name] + upload[name] for name in sums}
    real, present = ff.mean_class_gradients(sums["class_gradients"], sums["class_weights"])
    counts = sum(torch.bincount(data.client(cid)[1], minlength=num_classes) for cid in clients)
    assert sums["class_weights"].tolist() == counts.double().tolist()  # gradient_mean = samples: the class counts
    assert present.tolist() == (counts > 0).tolist()

    start = torch.randn(
        num_classes,
        cfg.section("creff").features_per_class,
        dim,
        generator=torch.Generator().manual_seed(derive_seed(cfg.run.seed, TAG_CREFF_FEATURES)),
    )
    expected = start.clone().requires_grad_(True)
    # Round 1's gradients are taken at the seeded initial classifier, which every rank builds alike.
    head = strategy.head
    ff.match_federated_features(
        expected,
        torch.optim.SGD([expected], lr=cfg.section("creff").lr_feature),
        real,
        present,
        head[:, :-1],
        head[:, -1],
        1,
    )
    assert (features_one - expected.detach()).abs().max().item() <= 1e-5
    assert (features_one - start).abs().max().item() > 1e-4  # the step really moved the features
