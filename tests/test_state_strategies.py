"""SCAFFOLD, FedDyn and FedNova against a step computed by hand (numpy) on two clients of a tiny linear model: the
strategies' client hooks drive real local SGD through their local_loss, then the server step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mllmfl_dist.config import FederatedConfig
from mllmfl_dist.fl.aggregation import FlatLayout, weighted_mean
from mllmfl_dist.fl.strategies import ClientContext, StrategyArgs
from mllmfl_dist.fl.strategies.feddyn import FedDyn
from mllmfl_dist.fl.strategies.fednova import FedNova, normalizing_weight
from mllmfl_dist.fl.strategies.scaffold import Scaffold
from mllmfl_dist.config.strategy_sections import FedDynConfig

LR = 0.1
GEN = np.random.default_rng(0)
X0 = GEN.normal(size=(2, 3))  # the global model [W | b] of a 3 -> 2 linear classifier
CLIENTS = [(GEN.normal(size=(4, 3)), np.array([0, 1, 1, 0])), (GEN.normal(size=(2, 3)), np.array([1, 0]))]


def ce_grad(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gradient of the mean cross-entropy of logits x W^T + b with respect to [W | b] (by hand: softmax - onehot)."""
    w, b = theta[:, :2], theta[:, 2]
    logits = x[:, :2] @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    p /= len(y)
    return np.concatenate([p.T @ x[:, :2], p.sum(0)[:, None]], axis=1)


def model_at(theta: np.ndarray) -> nn.Linear:
    model = nn.Linear(2, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(theta[:, :2]))
        model.bias.copy_(torch.from_numpy(theta[:, 2]))
    return model


def flat(theta: np.ndarray) -> torch.Tensor:
    """[W | b] in the trainer's flat layout of nn.Linear's state dict (weight, then bias)."""
    return torch.from_numpy(np.concatenate([theta[:, :2].ravel(), theta[:, 2]]))


def unflat(vector) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float64)
    return np.concatenate([v[:4].reshape(2, 2), v[4:, None]], axis=1)


def local_training(
    strategy, theta: np.ndarray, data, steps: int, momentum: float = 0.0, weight_decay: float = 0.0
) -> torch.Tensor:
    """``steps`` full-batch SGD steps on the strategy's local loss (as train_client takes them)."""
    model = model_at(theta)
    global_params = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum, weight_decay=weight_decay)
    x, y = torch.from_numpy(data[0][:, :2]), torch.from_numpy(data[1])
    for _ in range(steps):
        loss = strategy.local_loss(model, model(x), y, global_params)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return FlatLayout.of_module(model).flatten(model.state_dict())


def fed(**kw) -> FederatedConfig:
    return FederatedConfig(lr=LR, num_clients=5, clients_per_round=2, **kw)


MASK = torch.ones(6, dtype=torch.bool)


def test_scaffold_step_on_two_clients_equals_the_paper_by_hand():
    strategy = Scaffold(StrategyArgs(fed(server_lr=0.5), seed=0))
    c, c1 = GEN.normal(size=(2, 3)) * 0.1, GEN.normal(size=(2, 3)) * 0.1  # server c; client 0's c_i (client 1: none)
    strategy.receive_state({"control": flat(c).float()})
    c = unflat(flat(c).float().double())  # what every rank holds: c as broadcast (float32)
    states = [{"control": flat(c1).float()}, None]
    c1 = unflat(flat(c1).float().double())
    steps = [3, 2]
    trained, sums, new_states = [], {"delta_control": torch.zeros(6, dtype=torch.float64)}, []
    for k, (data, state, K) in enumerate(zip(CLIENTS, states, steps)):
        client = ClientContext(k, 1, len(data[1]), K, state)
        strategy.start_client(model_at(X0), client)
        y = local_training(strategy, X0, data, K)
        update = strategy.finish_client(None, client, flat(X0), y, MASK)
        trained.append(y)
        sums["delta_control"] += update.uploads["delta_control"]
        new_states.append(update.state["control"])

        c_i = c1 if state is not None else np.zeros_like(c)
        expected_y = X0.copy()
        for _ in range(K):
            expected_y -= LR * (ce_grad(expected_y, data[0], data[1]) + c - c_i)
        np.testing.assert_allclose(unflat(y), expected_y, rtol=1e-5, atol=1e-6)
        expected_c_i = c_i - c + (X0 - expected_y) / (K * LR)  # option II
        np.testing.assert_allclose(unflat(update.state["control"]), expected_c_i, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(unflat(update.uploads["delta_control"]), expected_c_i - c_i, rtol=1e-5, atol=1e-6)

    mean = weighted_mean(trained, [4, 2])
    new = strategy.server_update(flat(X0), mean, MASK, sums)
    expected_mean = (4 * unflat(trained[0]) + 2 * unflat(trained[1])) / 6
    np.testing.assert_allclose(unflat(new), X0 + 0.5 * (expected_mean - X0), rtol=1e-10)  # eta_g = 0.5
    strategy.process_uploads(None, sums, 1)
    expected_c = c + (unflat(new_states[0]) - c1 + unflat(new_states[1])) / 5  # c += sum delta_c_i / N
    np.testing.assert_allclose(unflat(strategy.control.double()), expected_c, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("momentum, weight_decay", [(0.9, 0.0), (0.5, 0.1), (0.0, 0.1)])
def test_scaffold_control_variate_with_local_momentum_and_weight_decay_is_the_mean_gradient_by_hand(
    momentum, weight_decay
):
    """Two local steps of heavy-ball SGD, by hand: b1 = d0, y1 = x - lr d0; b2 = mu d0 + d1, y2 = y1 - lr b2, with
    d_s = g(y_s) + lambda y_s + c - c_i. So x - y2 = lr ((1 + mu) d0 + d1) and option II's c_i+ must be the
    weighted mean ((1 + mu) (g(x) + lambda x) + g(y1) + lambda y1) / (2 + mu): the correction c - c_i cancels
    exactly (dividing by K = 2 would leave mu / 2 of it)."""
    strategy = Scaffold(StrategyArgs(fed(momentum=momentum, weight_decay=weight_decay), seed=0))
    c, c1 = GEN.normal(size=(2, 3)) * 0.1, GEN.normal(size=(2, 3)) * 0.1
    strategy.receive_state({"control": flat(c).float()})
    c, state = unflat(flat(c).float().double()), {"control": flat(c1).float()}
    c1 = unflat(flat(c1).float().double())
    data = CLIENTS[0]
    client = ClientContext(0, 1, len(data[1]), 2, state)
    strategy.start_client(model_at(X0), client)
    y = local_training(strategy, X0, data, 2, momentum=momentum, weight_decay=weight_decay)
    update = strategy.finish_client(None, client, flat(X0), y, MASK)

    def regularised(theta):
        return ce_grad(theta, data[0], data[1]) + weight_decay * theta

    d0 = regularised(X0) + c - c1
    y1 = X0 - LR * d0
    d1 = regularised(y1) + c - c1
    y2 = y1 - LR * (momentum * d0 + d1)
    np.testing.assert_allclose(unflat(y), y2, rtol=1e-5, atol=1e-6)
    expected = ((1 + momentum) * regularised(X0) + regularised(y1)) / (2 + momentum)
    np.testing.assert_allclose(unflat(update.state["control"]), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(unflat(update.uploads["delta_control"]), expected - c1, rtol=1e-5, atol=1e-6)


def test_feddyn_step_on_two_clients_equals_the_paper_by_hand():
    alpha = 0.3
    strategy = FedDyn(StrategyArgs(fed(), seed=0), FedDynConfig(alpha=alpha))
    g0 = unflat(flat(GEN.normal(size=(2, 3)) * 0.1).float().double())  # client 0's stored gradient
    h = GEN.normal(size=6) * 0.01
    strategy.h = torch.from_numpy(h.copy())
    states = [{"gradient": flat(g0).float()}, None]
    steps = [3, 2]
    trained = []
    sums = {"delta_sum": torch.zeros(6, dtype=torch.float64), "clients": torch.zeros(1, dtype=torch.float64)}
    for k, (data, state, K) in enumerate(zip(CLIENTS, states, steps)):
        client = ClientContext(k, 1, len(data[1]), K, state)
        strategy.start_client(model_at(X0), client)
        y = local_training(strategy, X0, data, K)
        update = strategy.finish_client(None, client, flat(X0), y, MASK)
        trained.append(y)
        for name in sums:
            sums[name] += update.uploads[name]

        g = g0 if state is not None else np.zeros_like(X0)
        expected_y = X0.copy()
        for _ in range(K):  # gradient of L_k(theta) - <g_k, theta> + alpha/2 ||theta - theta^{t-1}||^2
            expected_y -= LR * (ce_grad(expected_y, data[0], data[1]) - g + alpha * (expected_y - X0))
        np.testing.assert_allclose(unflat(y), expected_y, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            unflat(update.state["gradient"]), g - alpha * (expected_y - X0), rtol=1e-5, atol=1e-6
        )

    new = strategy.server_update(flat(X0), weighted_mean(trained, [4, 2]), MASK, sums)
    deltas = [unflat(t) - X0 for t in trained]
    expected_h = unflat(h) - alpha / 5 * (deltas[0] + deltas[1])
    np.testing.assert_allclose(unflat(strategy.h), expected_h, rtol=1e-10)
    np.testing.assert_allclose(unflat(new), X0 + (deltas[0] + deltas[1]) / 2 - expected_h / alpha, rtol=1e-10)


def test_fednova_normalises_by_local_steps_with_momentum_as_in_the_paper():
    rho = 0.5
    # ||a||_1 by hand: the gradient of step k weighs sum_{j < K - k} rho^j in the update.
    for steps in (1, 2, 5):
        by_hand = sum(sum(rho**j for j in range(steps - k)) for k in range(steps))
        assert normalizing_weight(steps, rho) == pytest.approx(by_hand, rel=1e-12)
    assert normalizing_weight(4, 0.0) == 4

    strategy = FedNova(StrategyArgs(fed(momentum=rho, server_lr=0.8), seed=0))
    steps = [3, 1]
    trained, sums = (
        [],
        {
            "normalized_update": torch.zeros(6, dtype=torch.float64),
            "tau": torch.zeros(1, dtype=torch.float64),
            "weight": torch.zeros(1, dtype=torch.float64),
        },
    )
    for k, (data, K) in enumerate(zip(CLIENTS, steps)):
        client = ClientContext(k, 1, len(data[1]), K, None)
        y = local_training(strategy, X0, data, K, momentum=rho)
        update = strategy.finish_client(None, client, flat(X0), y, MASK)
        trained.append(y)
        for name in sums:
            sums[name] += update.uploads[name]
    new = strategy.server_update(flat(X0), weighted_mean(trained, [4, 2]), MASK, sums)
    p = np.array([4, 2]) / 6
    a = [by_momentum(K, rho) for K in steps]
    tau_eff = p @ a
    d = sum(p[i] * (X0 - unflat(trained[i])) / a[i] for i in range(2))
    np.testing.assert_allclose(unflat(new), X0 - 0.8 * tau_eff * d, rtol=1e-10)


def by_momentum(steps: int, rho: float) -> float:
    return sum(sum(rho**j for j in range(steps - k)) for k in range(steps))


def test_fednova_with_equal_steps_and_no_momentum_is_fedavg():
    strategy = FedNova(StrategyArgs(fed(), seed=0))
    sums = {
        "normalized_update": torch.zeros(6, dtype=torch.float64),
        "tau": torch.zeros(1, dtype=torch.float64),
        "weight": torch.zeros(1, dtype=torch.float64),
    }
    trained = []
    for k, data in enumerate(CLIENTS):
        y = local_training(strategy, X0, data, 2)
        trained.append(y)
        for name, t in strategy.finish_client(
            None, ClientContext(k, 1, len(data[1]), 2), flat(X0), y, MASK
        ).uploads.items():
            sums[name] += t
    mean = weighted_mean(trained, [4, 2])
    torch.testing.assert_close(strategy.server_update(flat(X0), mean, MASK, sums), mean, rtol=1e-12, atol=1e-12)
