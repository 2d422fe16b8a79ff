"""Vectorized clients (federated.vectorize, fl/vectorized.py): a group trained as one stacked model equals its
clients trained one after another, to float tolerance, on 1 and 3 processes; strategies that cannot be vectorized
are refused with one line.

The tolerance: 1e-5 on every entry of the model (weights, BatchNorm statistics). What vectorizing changes is the
order of float sums inside a grouped convolution; measured here it moves a round's model by about 1e-7, less than
running the same sequential round on 2 threads instead of 1 (about 3e-5). A wrong update (BatchNorm statistics
over another client's samples, a lost momentum or weight-decay term, a proximal term left out) moves it by 1e-3
or more.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from launchers import REPO, SMOKE, cli, final_model, max_abs_difference, sets, torchrun
from mllmfl_dist.config import ConfigError, load_config
from mllmfl_dist.fl.client import LocalTraining, train_client
from mllmfl_dist.fl.models import build_model
from mllmfl_dist.fl.sampling import client_groups
from mllmfl_dist.fl.strategies.base import vectorize_refusal
from mllmfl_dist.fl.strategies.fedavg import FedAvg, FedProx
from mllmfl_dist.fl.strategies.base import StrategyArgs
from mllmfl_dist.fl.vectorized import ClientStream, VectorizedClients, stacked_model

TOLERANCE = 1e-5
SPEC = LocalTraining(2, 8, 0.02, 0.9, 5e-4, True, 2, True, (0.3,), (0.3,))
# Ragged on purpose: a client of one sample (no step), of two (one batch), and sizes whose last batch is short.
SIZES = [13, 2, 1, 9, 30, 17, 8]


def clients(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, 256, (n, 1, 16, 16), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g))
        for n in SIZES
    ]


def sequential(model: nn.Module, strategy, data, global_params=(), spec=SPEC) -> tuple[list[dict], list[float]]:
    start = {k: v.clone() for k, v in model.state_dict().items()}
    states, losses = [], []
    for i, (images, labels) in enumerate(data):
        model.load_state_dict(start)
        losses.append(
            train_client(model, images, labels, spec, torch.Generator().manual_seed(i), strategy, global_params)
        )
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(start)
    return states, losses


PLAIN_SGD = LocalTraining(2, 8, 0.02, 0.0, 0.0, True, 2, True, (0.3,), (0.3,))


@pytest.mark.parametrize(
    "strategy_name, spec, frozen",
    [("fedavg", SPEC, False), ("fedprox", SPEC, False), ("fedavg", PLAIN_SGD, False), ("fedavg", SPEC, True)],
    ids=["fedavg", "fedprox", "fedavg-no-momentum-no-decay", "fedavg-frozen-stem"],
)
def test_a_stacked_group_equals_its_clients_one_after_another(strategy_name, spec, frozen):
    cfg = load_config(SMOKE, ["federated.prox_mu=0.5"])
    strategy = (FedAvg if strategy_name == "fedavg" else FedProx)(StrategyArgs(cfg.federated, 0))
    torch.manual_seed(0)
    model = build_model("resnet8", 1, 10)
    if frozen:  # a parameter that does not train: sequential SGD leaves it, and so must the stack
        model.conv1.weight.requires_grad_(False)
    global_params = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    data = clients()
    expected, expected_losses = sequential(model, strategy, data, global_params, spec)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [ClientStream(x, y, spec, torch.Generator().manual_seed(i)) for i, (x, y) in enumerate(data)]
    states, losses = VectorizedClients(model, spec, strategy.local_penalty).train(start, batches)
    for i, n in enumerate(SIZES):
        assert max_abs_difference(states[i], expected[i]) <= TOLERANCE, (i, n)
        if n < 2:  # no step: the start model, and a NaN loss, as sequential
            assert max_abs_difference(states[i], start) == 0.0
            assert losses[i] != losses[i] and expected_losses[i] != expected_losses[i]
        else:
            assert max_abs_difference(states[i], start) > 1e-3, (i, n)
            assert losses[i] == pytest.approx(expected_losses[i], rel=1e-5)
        tracked = [k for k in start if k.endswith("num_batches_tracked")]
        assert all(torch.equal(states[i][k], expected[i][k]) for k in tracked)
        if frozen:
            assert torch.equal(states[i]["conv1.weight"], start["conv1.weight"])


def test_fedprox_term_reaches_the_stacked_clients():
    """Same clients, FedProx at a large mu against FedAvg: the vectorized results differ as the sequential ones do."""
    cfg = load_config(SMOKE, ["federated.prox_mu=5.0"])
    torch.manual_seed(0)
    model = build_model("resnet8", 1, 10)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    data = clients()[:2]
    out = {}
    for cls in (FedAvg, FedProx):
        batches = [ClientStream(x, y, SPEC, torch.Generator().manual_seed(i)) for i, (x, y) in enumerate(data)]
        out[cls] = VectorizedClients(model, SPEC, cls(StrategyArgs(cfg.federated, 0)).local_penalty).train(
            start, batches
        )[0]
    assert max_abs_difference(out[FedAvg][0], out[FedProx][0]) > 1e-3


def test_a_layer_that_cannot_be_stacked_is_named():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4))
    with pytest.raises(ValueError, match=r"layer 1 \(GroupNorm\)"):
        stacked_model(model)


def test_groups_depend_on_the_round_not_on_the_hosts():
    ids, sizes = [3, 8, 11, 20, 25, 40, 41], [5, 50, 5, 7, 50, 1, 12]
    groups = client_groups(ids, sizes, 3)
    assert groups == [(8, 25, 41), (20, 3, 11), (40,)]  # runs in order of decreasing size, ties by id
    assert sorted(c for g in groups for c in g) == ids


@pytest.mark.parametrize("strategy", ["creff", "clip2fl", "scaffold", "feddyn", "fednova"])
def test_strategies_that_cannot_vectorize_are_refused_in_one_line(strategy, capsys):
    with pytest.raises(ConfigError) as error:
        load_config(SMOKE, [f"federated.strategy={strategy}", "federated.vectorize=4"])
    message = str(error.value)
    assert "\n" not in message and f"federated.strategy = {strategy!r}" in message and "vectorize" in message


def test_refusal_exits_2_from_the_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mllmfl_dist", "federate", str(SMOKE)]
        + sets(f"run.root={tmp_path}", "federated.strategy=scaffold", "federated.vectorize=2"),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "scaffold" in result.stderr


def test_server_side_strategies_and_their_subclasses_keep_or_lose_vectorizing():
    for name in ("fedavgm", "fedprox", "fedadam", "fedyogi"):
        load_config(SMOKE, [f"federated.strategy={name}", "federated.vectorize=4"])

    class Plugin(FedAvg):
        def local_loss(self, model, logits, labels, global_params, inputs=None):
            return super().local_loss(model, logits, labels, global_params, inputs) * 2

    assert "Plugin overrides local_loss" in (vectorize_refusal(Plugin) or "")

    class Declared(Plugin):
        vectorizable = True

    assert vectorize_refusal(Declared) is None


COMMON = [
    "dist.threads=1",
    "federated.local_epochs=1",
    "log.progress=false",
    "log.tensorboard=false",
    "federated.rounds=2",
    "federated.weight_decay=0.0005",
    "eval.every=2",
    "checkpoint.every=2",
]


@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm", "fedprox"])
def test_vectorized_on_one_and_three_processes_equals_sequential(tmp_path, strategy):
    """SGD with momentum 0.9 and weight decay, BatchNorm statistics per client: the sequential single-process
    run against vectorized runs on 1 process and under torchrun with 3 (two client hosts)."""
    run = [*COMMON, f"federated.strategy={strategy}", "federated.prox_mu=0.5"]
    assert cli("federate", str(SMOKE), sets=[f"run.root={tmp_path}", "run.name=seq", *run]) == 0
    assert (
        cli("federate", str(SMOKE), sets=[f"run.root={tmp_path}", "run.name=vec1", *run, "federated.vectorize=4"]) == 0
    )
    result = torchrun(3, tmp_path, "run.name=vec3", *run, "federated.vectorize=4")
    assert result.returncode == 0, result.stderr[-3000:]
    seq, vec1, vec3 = (final_model(tmp_path, name) for name in ("seq", "vec1", "vec3"))
    assert max_abs_difference(seq, vec1) <= TOLERANCE
    assert max_abs_difference(vec1, vec3) <= 1e-6  # the same groups on every world size; float64 sums differ
    assert max_abs_difference(seq, vec3) <= TOLERANCE


@pytest.mark.parametrize("strategy", ["fedadam"])
def test_server_side_strategies_vectorized_equal_sequential(tmp_path, strategy):
    """Their clients train as FedAvg's: vectorized against sequential on one process, within the tolerance."""
    run = [f"run.root={tmp_path}", *COMMON, f"federated.strategy={strategy}"]
    assert cli("federate", str(SMOKE), sets=[*run, "run.name=seq"]) == 0
    assert cli("federate", str(SMOKE), sets=[*run, "run.name=vec", "federated.vectorize=3"]) == 0
    assert max_abs_difference(final_model(tmp_path, "seq"), final_model(tmp_path, "vec")) <= TOLERANCE


def test_a_vectorized_run_resumed_equals_a_straight_one(tmp_path):
    """Groups depend on the round only, so a resume from round 1's checkpoint trains round 2 as a straight run
    does; the resume may also switch vectorizing off (the same model to the tolerance)."""
    run = [f"run.root={tmp_path}", *COMMON, "federated.vectorize=4"]
    assert cli("federate", str(SMOKE), sets=[*run, "run.name=straight"]) == 0
    assert cli("federate", str(SMOKE), sets=[*run, "run.name=resumed", "federated.rounds=1"]) == 0
    assert cli("federate", str(SMOKE), sets=[*run, "run.name=resumed"]) == 0
    straight, resumed = final_model(tmp_path, "straight"), final_model(tmp_path, "resumed")
    assert max_abs_difference(straight, resumed) == 0.0
    assert cli("federate", str(SMOKE), sets=[*run, "run.name=switched", "federated.rounds=1"]) == 0
    assert cli("federate", str(SMOKE), sets=[*run, "run.name=switched", "federated.vectorize=1"]) == 0
    assert max_abs_difference(straight, final_model(tmp_path, "switched")) <= TOLERANCE
