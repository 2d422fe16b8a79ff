"""CReFF's maths (federated features, gradient matching, classifier re-training) on known problems."""

import numpy as np
import torch
from torch import nn

from mllmfl_dist.fl import federated_features as ff


def test_linear_ce_gradients_equal_autograd_per_class():
    torch.manual_seed(0)
    num_classes, m, dim = 5, 4, 7
    features, weight, bias = torch.randn(num_classes, m, dim), torch.randn(num_classes, dim), torch.randn(num_classes)
    grads = ff.linear_ce_gradients(features, weight, bias)
    assert grads.shape == (num_classes, num_classes, dim + 1)
    for c in range(num_classes):
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        loss = nn.functional.cross_entropy(features[c] @ w.T + b, torch.full((m,), c))
        gw, gb = torch.autograd.grad(loss, [w, b])
        torch.testing.assert_close(grads[c, :, :dim], gw)
        torch.testing.assert_close(grads[c, :, dim], gb)
    # Groups with explicit labels: a batch of class 3 features.
    one = ff.linear_ce_gradients(features[3][None], weight, bias, torch.tensor([3]))[0]
    torch.testing.assert_close(one, grads[3])


def test_gradient_distance_is_zero_for_identical_gradients_and_positive_otherwise():
    torch.manual_seed(1)
    g = torch.randn(3, 10, 9)  # 3 classes' gradients of a 10-class classifier [W | b] on 8-d features
    assert ff.gradient_distance(g, g).item() < 1e-5
    assert ff.gradient_distance(g, 2.5 * g).item() < 1e-5  # a cosine: the scale does not matter
    other = torch.randn(3, 10, 9)

    def one_minus_cos(a, b):
        return 1 - np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))

    # Each weight row, plus the bias gradient as one more row.
    expected = sum(
        one_minus_cos(a, b) for a, b in zip(g[..., :8].reshape(-1, 8).numpy(), other[..., :8].reshape(-1, 8).numpy())
    )
    expected += sum(one_minus_cos(g[c, :, 8].numpy(), other[c, :, 8].numpy()) for c in range(3))
    assert ff.gradient_distance(g, other).item() > 0
    np.testing.assert_allclose(ff.gradient_distance(g, other).item(), expected, rtol=1e-4)
    assert abs(ff.gradient_distance(g, -g).item() - 2 * (30 + 3)) < 1e-3  # opposite rows: 2 per row


def test_class_gradient_sums_over_clients_give_the_sample_weighted_mean():
    torch.manual_seed(2)
    num_classes, dim = 4, 6
    weight, bias = torch.randn(num_classes, dim), torch.randn(num_classes)
    # Client A holds classes 0 and 1 (30 and 5 samples), client B class 1 only (15 samples).
    fa, fb = torch.randn(8, dim), torch.randn(8, dim)
    counts_a, counts_b = torch.tensor([30, 5, 0, 0]), torch.tensor([0, 15, 0, 0])
    sums = ff.class_gradient_sums([(0, fa[:4]), (1, fa[4:])], counts_a, weight, bias) + ff.class_gradient_sums(
        [(1, fb[:4]), (1, fb[4:])], counts_b, weight, bias
    )
    means, present = ff.mean_class_gradients(sums, (counts_a + counts_b).double())
    assert present.tolist() == [True, True, False, False]

    def grad(features, c):
        return ff.linear_ce_gradients(features[None], weight, bias, torch.tensor([c]))[0]

    torch.testing.assert_close(means[0], grad(fa[:4], 0))
    # Class 1: client B's two batches averaged, then weighted 15 : 5 against client A's.
    expected = (5 * grad(fa[4:], 1) + 15 * (grad(fb[:4], 1) + grad(fb[4:], 1)) / 2) / 20
    torch.testing.assert_close(means[1], expected)
    assert means[2].abs().sum() == 0


def test_pick_class_batches_draws_only_the_classes_held():
    labels = torch.tensor([2, 2, 0, 2, 0, 2, 2])
    picked = ff.pick_class_batches(labels, 4, batch_size=3, batches=2, generator=torch.Generator().manual_seed(0))
    assert [c for c, _ in picked] == [0, 0, 2, 2]
    for c, positions in picked:
        assert (labels[positions] == c).all() and len(positions) == min(3, int((labels == c).sum()))


def test_retrain_classifier_matches_nn_linear_trained_by_sgd():
    features = torch.randn(3, 10, 5, generator=torch.Generator().manual_seed(3))
    head = ff.retrain_classifier(features, epochs=4, lr=0.1, batch_size=7, generator=torch.Generator().manual_seed(9))
    # The same init, order and steps through autograd and torch.optim.SGD.
    generator = torch.Generator().manual_seed(9)
    bound = 1 / 5**0.5
    reference = nn.Linear(5, 3)
    with torch.no_grad():
        reference.weight.copy_(torch.empty(3, 5).uniform_(-bound, bound, generator=generator))
        reference.bias.copy_(torch.empty(3).uniform_(-bound, bound, generator=generator))
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    x, y = features.reshape(30, 5), torch.arange(3).repeat_interleave(10)
    for _ in range(4):
        order = torch.randperm(30, generator=generator)
        for start in range(0, 30, 7):
            batch = order[start : start + 7]
            loss = nn.functional.cross_entropy(reference(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.testing.assert_close(head.weight, reference.weight)
    torch.testing.assert_close(head.bias, reference.bias)


def _class_accuracy(head: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> np.ndarray:
    with torch.no_grad():
        predictions = head(x).argmax(dim=1)
    return np.array([(predictions[y == c] == c).float().mean().item() for c in range(num_classes)])


def test_federated_features_beat_the_head_biased_classifier_on_tail_classes():
    """Features drawn around class means, long-tailed 500 -> 5; the clients' gradients come from a
    classifier trained on that long tail (head-biased). Matching those gradients and re-training a fresh
    classifier on the federated features must do better on the tail (the last half of the classes)."""
    num_classes, dim = 10, 16
    generator = torch.Generator().manual_seed(1)
    means = torch.randn(num_classes, dim, generator=generator)
    counts = [int(500 * 0.01 ** (c / (num_classes - 1))) for c in range(num_classes)]

    def draw(n: int, c: int) -> torch.Tensor:
        return means[c] + torch.randn(n, dim, generator=generator)

    x_train = torch.cat([draw(n, c) for c, n in enumerate(counts)])
    y_train = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    x_test = torch.cat([draw(200, c) for c in range(num_classes)])
    y_test = torch.arange(num_classes).repeat_interleave(200)
    biased = nn.Linear(dim, num_classes)
    optimizer = torch.optim.SGD(biased.parameters(), lr=0.1)
    for _ in range(300):
        loss = nn.functional.cross_entropy(biased(x_train), y_train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    # Three clients, each holding a third of every class; their sums go through the payload's maths.
    pick = torch.Generator().manual_seed(0)
    sums = torch.zeros(num_classes, num_classes, dim + 1, dtype=torch.float64)
    counts_total = torch.zeros(num_classes, dtype=torch.float64)
    for client in range(3):
        mask = torch.arange(len(y_train)) % 3 == client
        x, y = x_train[mask], y_train[mask]
        batches = ff.pick_class_batches(y, num_classes, batch_size=32, batches=2, generator=pick)
        client_counts = torch.bincount(y, minlength=num_classes)
        sums += ff.class_gradient_sums(
            [(c, x[p]) for c, p in batches], client_counts, biased.weight.detach(), biased.bias.detach()
        )
        counts_total += client_counts
    real, present = ff.mean_class_gradients(sums, counts_total)

    features = torch.randn(num_classes, 50, dim, generator=pick).requires_grad_(True)
    feature_optimizer = torch.optim.SGD([features], lr=0.1)
    first = ff.match_federated_features(features, feature_optimizer, real, present, biased.weight, biased.bias, 1)
    last = ff.match_federated_features(features, feature_optimizer, real, present, biased.weight, biased.bias, 100)
    assert last < first  # the matching loss falls
    head = ff.retrain_classifier(features, epochs=100, lr=0.01, batch_size=32, generator=pick)

    tail = slice(num_classes // 2, num_classes)
    before = _class_accuracy(biased, x_test, y_test, num_classes)
    after = _class_accuracy(head, x_test, y_test, num_classes)
    assert after[tail].mean() > before[tail].mean() + 0.1, (before, after)


def test_text_contrast_loss_equals_the_supervised_contrast_over_all_pairs():
    """The closed form against the loss written over the N x N pairs: anchor i, candidates j != i scored
    against the text embedding of j's class, positives the j of i's class."""
    generator = torch.Generator().manual_seed(4)
    num_classes, m, dim, temperature = 4, 3, 6, 0.1
    features = torch.randn(num_classes, m, dim, generator=generator)
    text = nn.functional.normalize(torch.randn(num_classes, dim, generator=generator), dim=1)
    f = features.reshape(-1, dim).double()
    y = torch.arange(num_classes).repeat_interleave(m)
    scores = f @ text.double()[y].T / temperature  # [N, N]: feature i against the text of j's class
    n = len(y)
    losses = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        log_norm = torch.logsumexp(scores[i, others], dim=0)
        positives = [j for j in others if y[j] == y[i]]
        losses.append(-torch.stack([scores[i, j] - log_norm for j in positives]).mean())
    expected = torch.stack(losses).mean()
    torch.testing.assert_close(
        ff.text_contrast_loss(features, text, temperature).double(), expected, rtol=1e-5, atol=1e-5
    )
    # Features on their class's embedding score lower than features on another class's.
    aligned = text[:, None, :].repeat(1, m, 1) * 5
    assert ff.text_contrast_loss(aligned, text, temperature) < ff.text_contrast_loss(
        aligned[[1, 2, 3, 0]], text, temperature
    )
