"""Aggregation maths against numpy, strategies' server steps, sampling and host assignment."""

import numpy as np
import pytest
import torch

from mllmfl_dist.config import Config, FederatedConfig
from mllmfl_dist.fl.aggregation import FlatLayout, accumulate_, mean_from_sum, new_accumulator, weighted_mean
from mllmfl_dist.core.seeds import derive_seed
from mllmfl_dist.fl.sampling import assign_clients, sample_clients
from mllmfl_dist.fl.strategies import FedAvg, FedAvgM, FedProx, StrategyArgs, build_strategy
from mllmfl_dist.fl.models import build_model


def _client_states(num, seed=0):
    """State dicts of differently trained-looking models: random params and BatchNorm buffers."""
    states = []
    for k in range(num):
        torch.manual_seed(seed + k)
        model = build_model("resnet8", 3, 5)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
            for b in model.buffers():
                if b.dtype.is_floating_point:
                    b.uniform_(0.5, 2.0)
                else:
                    b.fill_(10 * (k + 1))
        states.append(model.state_dict())
    return model, states


def test_weighted_mean_matches_numpy_including_batchnorm_buffers():
    model, states = _client_states(4)
    weights = [13, 1, 250, 7]
    layout = FlatLayout.of_module(model)
    mean = layout.unflatten(weighted_mean([layout.flatten(s) for s in states], weights))
    for key in layout.keys:
        stacked = np.stack([s[key].double().numpy() for s in states])
        expected = np.average(stacked, axis=0, weights=np.array(weights, dtype=np.float64))
        if states[0][key].dtype.is_floating_point:
            np.testing.assert_allclose(mean[key].double().numpy(), expected, rtol=1e-6, atol=1e-7)
        else:
            assert mean[key].item() == round(float(expected))
    assert any("running_var" in k for k in layout.keys)


def test_split_accumulation_equals_one_accumulator():
    """Two hosts' partial sums added (what all_reduce does) give the single-host mean."""
    model, states = _client_states(5, seed=10)
    layout = FlatLayout.of_module(model)
    flats = [layout.flatten(s) for s in states]
    weights = [3, 9, 1, 4, 4]
    host_a, host_b = new_accumulator(layout.numel), new_accumulator(layout.numel)
    for i, (flat, w) in enumerate(zip(flats, weights)):
        accumulate_(host_a if i % 2 else host_b, flat, w)
    combined = mean_from_sum(host_a + host_b)
    assert host_a[-1] + host_b[-1] == sum(weights)
    torch.testing.assert_close(combined, weighted_mean(flats, weights), rtol=0, atol=1e-12)


def test_zero_total_weight_is_an_error():
    with pytest.raises(RuntimeError, match="no client"):
        mean_from_sum(new_accumulator(3))


def test_layout_marks_parameters_trainable_and_buffers_not():
    model = build_model("resnet8", 1, 3)
    layout = FlatLayout.of_module(model)
    n_params = sum(p.numel() for p in model.parameters())
    assert int(layout.trainable_mask.sum()) == n_params
    assert layout.numel == sum(t.numel() for t in model.state_dict().values())
    flat = layout.flatten(model.state_dict())
    again = build_model("resnet8", 1, 3)
    layout.unflatten_into(flat, again.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])


def _server_inputs():
    mask = torch.tensor([True, True, True, False])
    return torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=torch.float64), mask


def test_fedavg_global_update_is_the_mean():
    global_flat, mask = _server_inputs()
    mean = torch.tensor([0.0, 1.0, 5.0, 0.7], dtype=torch.float64)
    new = FedAvg(StrategyArgs(FederatedConfig(), seed=0)).update_global_model(global_flat, mean, mask)
    torch.testing.assert_close(new, mean, rtol=0, atol=1e-15)


def test_fedavgm_matches_numpy_momentum():
    cfg = FederatedConfig(strategy="fedavgm", server_lr=0.5, server_momentum=0.9)
    strategy = build_strategy(Config(federated=cfg))
    assert isinstance(strategy, FedAvgM)
    w, mask = _server_inputs()
    w_np = w.numpy().copy()
    velocity = np.zeros(3)
    rng = np.random.default_rng(0)
    for _ in range(4):
        mean = torch.from_numpy(rng.normal(size=4))
        delta = w_np[:3] - mean.numpy()[:3]
        velocity = 0.9 * velocity + delta
        w_np[:3] = w_np[:3] - 0.5 * velocity
        w_np[3] = mean.numpy()[3]  # buffers take the mean, no momentum
        w = strategy.update_global_model(w, mean, mask)
        np.testing.assert_allclose(w.numpy(), w_np, rtol=1e-12)


def test_server_optimizer_state_survives_a_round_trip():
    cfg = FederatedConfig(strategy="fedavgm", server_momentum=0.9)
    w, mask = _server_inputs()
    means = [torch.full((4,), float(v), dtype=torch.float64) for v in (0.3, -1.0, 2.0)]
    straight = build_strategy(Config(federated=cfg))
    w_straight = straight.update_global_model(w, means[0], mask)
    resumed = build_strategy(Config(federated=cfg))
    resumed.load_state_dict(straight.state_dict())
    for mean in means[1:]:
        w_straight = straight.update_global_model(w_straight, mean, mask)
    w_resumed = build_strategy(Config(federated=cfg)).update_global_model(w, means[0], mask)
    for mean in means[1:]:
        w_resumed = resumed.update_global_model(w_resumed, mean, mask)
    torch.testing.assert_close(w_resumed, w_straight, rtol=0, atol=1e-15)


def test_fedprox_adds_the_proximal_term():
    strategy = FedProx(StrategyArgs(FederatedConfig(strategy="fedprox", prox_mu=0.2), seed=0))
    model = torch.nn.Linear(3, 2)
    global_params = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        model.weight.add_(1.0)
    logits = torch.zeros(4, 2)
    labels = torch.tensor([0, 1, 0, 1])
    base = torch.nn.functional.cross_entropy(logits, labels)
    loss = strategy.local_loss(model, logits, labels, global_params)
    assert loss.item() == pytest.approx(base.item() + 0.5 * 0.2 * 6.0)


def test_client_sampling_depends_only_on_seed_and_round():
    a = sample_clients(0, 3, 100_000, 10)
    assert a == sample_clients(0, 3, 100_000, 10)
    assert len(set(a)) == 10 and all(0 <= c < 100_000 for c in a)
    assert a != sample_clients(0, 4, 100_000, 10)
    assert a != sample_clients(1, 3, 100_000, 10)
    assert sorted(sample_clients(5, 1, 8, 8)) == list(range(8))


def test_assignment_is_balanced_and_deterministic():
    clients = [4, 8, 15, 16, 23, 42]
    sizes = [100, 10, 90, 20, 50, 60]
    plan = assign_clients(clients, sizes, hosts=(1, 2))
    assert plan == assign_clients(clients, sizes, hosts=(1, 2))
    assert sorted(plan[1] + plan[2]) == clients
    load = {h: sum(sizes[clients.index(c)] for c in plan[h]) for h in plan}
    assert abs(load[1] - load[2]) <= max(sizes)
    assert abs(load[1] - load[2]) == 10  # LPT: 100+50+20 = 170 against 90+60+10 = 160
    equal = assign_clients(list(range(10)), [64] * 10, hosts=(1, 2))
    assert len(equal[1]) == len(equal[2]) == 5


def test_derived_seeds_differ_by_key():
    seeds = {derive_seed(0, 2, r, c) for r in range(5) for c in range(50)}
    assert len(seeds) == 250
    assert derive_seed(0, 2, 1, 1) == derive_seed(0, 2, 1, 1)
    assert 0 <= derive_seed(123, 4) < 2**63
