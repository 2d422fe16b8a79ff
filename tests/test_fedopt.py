"""FedAdagrad, FedAdam and FedYogi: the server step against numpy, the optimizer state through a checkpoint file,
the [fedopt] section, and a real run on 1 and 3 processes."""

import numpy as np
import pytest
import torch

from launchers import SMOKE, cli, final_model, max_abs_difference, torchrun

from mllmfl_dist.commands.compare_methods import Method
from mllmfl_dist.commands.tuning import method_grid, parse_tune, reads, TuneSpec
from mllmfl_dist.config import ConfigError, load_config
from mllmfl_dist.fl.aggregation import weighted_mean
from mllmfl_dist.fl.strategies import build_strategy

# Every knob away from its default, so that a step ignoring one of them fails.
KNOBS = {"server_lr": 0.5, "eta": 0.2, "beta1": 0.8, "beta2": 0.95, "tau": 0.01}
SETS = [
    f"federated.server_lr={KNOBS['server_lr']}",
    f"fedopt.eta={KNOBS['eta']}",
    f"fedopt.beta1={KNOBS['beta1']}",
    f"fedopt.beta2={KNOBS['beta2']}",
    f"fedopt.tau={KNOBS['tau']}",
]
MASK = torch.tensor([True, True, True, True, False])  # the last entry is a buffer (BatchNorm statistics)


def _strategy(name: str, *overrides: str):
    return build_strategy(load_config(SMOKE, [f"federated.strategy={name}", *SETS, *overrides]))


def _rounds() -> tuple[np.ndarray, list[tuple[list[np.ndarray], list[float]]]]:
    """A start model and two rounds of two clients each (their states and sample counts). In each round some
    entries of the pseudo-gradient are small against the last v and some large, so that FedYogi's sign takes
    both values in both rounds."""
    start = np.array([0.5, -1.0, 2.0, 0.0, 1.0])
    round1 = (
        [start + np.array([0.4, -0.2, 0.05, 0.0, 0.3]), start + np.array([0.8, 0.1, -0.05, 0.02, -0.5])],
        [3.0, 1.0],
    )
    round2 = ([np.array([0.5, 1.0, 2.0, 0.6, 0.4]), np.array([0.575, 0.6, 2.6, 0.2, 1.2])], [1.0, 2.0])
    return start, [round1, round2]


def _numpy_fedopt(rule: str, start: np.ndarray, rounds) -> tuple[np.ndarray, list[np.ndarray]]:
    """Algorithm 2 of Reddi et al. (ICLR 2021) by hand: the model after the rounds, and each round's
    sign(v_{t-1} - Delta^2)."""
    eta = KNOBS["server_lr"] * KNOBS["eta"]
    beta1, beta2, tau = KNOBS["beta1"], KNOBS["beta2"], KNOBS["tau"]
    x = start.copy()
    m, v = np.zeros(4), np.full(4, tau**2)
    signs = []
    for states, weights in rounds:
        mean = sum(w * s for w, s in zip(weights, states)) / sum(weights)
        delta = mean[:4] - x[:4]
        signs.append(np.sign(v - delta**2))
        m = beta1 * m + (1 - beta1) * delta
        if rule == "fedadagrad":
            v = v + delta**2
        elif rule == "fedadam":
            v = beta2 * v + (1 - beta2) * delta**2
        else:
            v = v - (1 - beta2) * delta**2 * np.sign(v - delta**2)
        x[:4] = x[:4] + eta * m / (np.sqrt(v) + tau)
        x[4] = mean[4]  # buffers take the clients' weighted mean
    return x, signs


@pytest.mark.parametrize("name", ["fedadagrad", "fedadam", "fedyogi"])
def test_two_server_steps_match_algorithm_2_by_hand(name):
    start, rounds = _rounds()
    expected, signs = _numpy_fedopt(name, start, rounds)
    strategy = _strategy(name)
    x = torch.from_numpy(start)
    for states, weights in rounds:
        mean = weighted_mean([torch.from_numpy(s) for s in states], weights)  # the trainer's aggregation
        x = strategy.update_global_model(x, mean, MASK)
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-12, atol=1e-15)
    if name == "fedyogi":
        assert all({1.0, -1.0} <= set(sign.tolist()) for sign in signs)  # both of Yogi's branches, each round
    # The three rules differ, and none is FedAvg (the plain mean) or a plain lr step along the delta.
    others = {other: _numpy_fedopt(other, start, rounds)[0] for other in ("fedadagrad", "fedadam", "fedyogi")}
    assert all(np.abs(expected - x_other).max() > 1e-4 for other, x_other in others.items() if other != name)
    mean2 = weighted_mean([torch.from_numpy(s) for s in rounds[1][0]], rounds[1][1]).numpy()
    assert np.abs(expected[:4] - mean2[:4]).max() > 1e-2


def test_first_step_is_eta_times_a_tenth_of_delta_over_its_size(tmp_path):
    """FedAdam's first step from m = 0, v = tau^2 (checked by hand, with the default beta1 = 0.9, beta2 = 0.99):
    m = 0.1 Delta, v = 0.99 tau^2 + 0.01 Delta^2, so a step of eta * 0.1 Delta / (sqrt(v) + tau)."""
    strategy = build_strategy(load_config(SMOKE, ["federated.strategy=fedadam"]))
    current = torch.zeros(5, dtype=torch.float64)
    mean = torch.tensor([1.0, -2.0, 0.0, 1e-4, 7.0], dtype=torch.float64)
    new = strategy.update_global_model(current, mean, MASK)
    tau, eta = 1e-3, 0.01
    by_hand = [eta * 0.1 * d / (np.sqrt(0.99 * tau**2 + 0.01 * d**2) + tau) for d in (1.0, -2.0, 0.0, 1e-4)]
    np.testing.assert_allclose(new.numpy(), [*by_hand, 7.0], rtol=1e-12, atol=0)
    assert abs(new[0].item() - 0.00990050) < 1e-8  # 0.001 / (0.1000049 + 0.001): about eta * sign(Delta)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_optimizer_state_through_a_checkpoint_file_resumes_bit_identically(tmp_path, name):
    start, rounds = _rounds()
    means = [weighted_mean([torch.from_numpy(s) for s in states], weights) for states, weights in rounds]
    means.append(means[0] * 0.5)
    straight = _strategy(name)
    x_straight = torch.from_numpy(start)
    for mean in means:
        x_straight = straight.update_global_model(x_straight, mean, MASK)

    first = _strategy(name)
    x = first.update_global_model(torch.from_numpy(start), means[0], MASK)
    torch.save({"strategy": first.state_dict(), "model": x}, tmp_path / "checkpoint.pt")
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["strategy"]["steps"] == 1 and saved["strategy"]["m"].dtype == torch.float64
    resumed = _strategy(name)
    resumed.load_state_dict(saved["strategy"])
    x = saved["model"]
    for mean in means[1:]:
        x = resumed.update_global_model(x, mean, MASK)
    assert torch.equal(x, x_straight)
    # Without the state the same steps land elsewhere: the moments matter.
    fresh = _strategy(name)
    x_fresh = saved["model"]
    for mean in means[1:]:
        x_fresh = fresh.update_global_model(x_fresh, mean, MASK)
    assert (x_fresh - x_straight).abs().max().item() > 1e-4
    with pytest.raises(ValueError, match="'adagrad'"):
        _strategy("fedadagrad").load_state_dict(saved["strategy"])


def test_the_fedopt_section_has_the_paper_defaults_and_checked_bounds(capsys):
    cfg = load_config(SMOKE, ["federated.strategy=fedyogi"])
    fedopt = cfg.section("fedopt")
    assert (fedopt.eta, fedopt.beta1, fedopt.beta2, fedopt.tau) == (0.01, 0.9, 0.99, 1e-3)
    for bad, words in (
        ("fedopt.beta1=1", "fedopt.beta1 = 1.0 is not allowed"),
        ("fedopt.beta2=-0.1", "fedopt.beta2 = -0.1 is not allowed"),
        ("fedopt.tau=0", "fedopt.tau = 0.0 is not allowed"),
        ("fedopt.eta=0", "fedopt.eta = 0.0 is not allowed"),
        ("fedopt.momentum=0.9", "unknown key fedopt.momentum"),
    ):
        with pytest.raises(ConfigError, match=words):
            load_config(SMOKE, ["federated.strategy=fedyogi", bad])
    assert cli("federate", str(SMOKE), sets=["federated.strategy=fedadam", "fedopt.tau=-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fedopt.tau = -1.0 is not allowed" in err[0]


def test_compare_tunes_fedopt_keys_only_for_the_strategies_reading_them():
    grid = parse_tune(["fedopt.eta=0.01,0.1", "fedopt.beta2=0.9,0.99"])
    assert grid["fedopt.eta"] == (0.01, 0.1)
    spec = TuneSpec(grid, budget=4)
    assert method_grid(Method("fedadam"), spec) == [
        {"fedopt.eta": e, "fedopt.beta2": b} for e in (0.01, 0.1) for b in (0.9, 0.99)
    ]
    assert method_grid(Method("fedadagrad"), spec) == [{"fedopt.eta": 0.01}, {"fedopt.eta": 0.1}]  # no beta2
    assert reads(Method("fedyogi"), "fedopt.beta2") and not reads(Method("fedavg"), "fedopt.eta")
    assert method_grid(Method("fedavgm"), spec) == [{}]


def test_fedadam_on_one_and_three_processes_and_after_a_resume_ends_with_the_same_model(tmp_path):
    common = [
        "federated.strategy=fedadam",
        "fedopt.eta=0.05",
        "dist.threads=1",
        "federated.num_clients=12",
        "federated.clients_per_round=5",
        "federated.local_epochs=1",
        "eval.every=10",
        "log.progress=false",
        "log.tensorboard=false",
    ]
    three = torchrun(3, tmp_path, *common, "run.name=three", "federated.rounds=3")
    assert three.returncode == 0, three.stdout[-3000:] + three.stderr[-3000:]
    common = [f"run.root={tmp_path}", *common]  # torchrun sets it itself
    assert cli("federate", str(SMOKE), sets=[*common, "run.name=one", "federated.rounds=3"]) == 0
    assert max_abs_difference(final_model(tmp_path, "one"), final_model(tmp_path, "three")) <= 1e-5

    assert cli("federate", str(SMOKE), sets=[*common, "run.name=resumed", "federated.rounds=2"]) == 0
    assert cli("federate", str(SMOKE), sets=[*common, "run.name=resumed", "federated.rounds=3"]) == 0
    assert max_abs_difference(final_model(tmp_path, "one"), final_model(tmp_path, "resumed")) <= 1e-6
    state = torch.load(tmp_path / "resumed" / "federated" / "checkpoint.pt", weights_only=True)["strategy"]
    assert state["rule"] == "adam" and state["steps"] == 3 and state["m"].abs().max().item() > 0
