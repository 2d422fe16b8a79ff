"""The partitions researchers compare against: flwr-datasets' DirichletPartitioner options and McMahan et
al.'s shards, each against a literal numpy/Python reference written here from the published algorithm."""

from __future__ import annotations

import numpy as np
import pytest

from mllmfl_dist.config import ConfigError, load_config
from mllmfl_dist.core.seeds import TAG_DIRICHLET, TAG_SHARDS
from mllmfl_dist.data import DataError, partition_indices
from mllmfl_dist.data.longtail import longtail_counts


def long_tailed_labels(num_classes: int = 10, head: int = 300, imb_factor: float = 0.05) -> np.ndarray:
    counts = longtail_counts(head, num_classes, imb_factor)
    labels = np.repeat(np.arange(num_classes), counts)
    return np.random.default_rng(7).permutation(labels)  # classes interleaved, as in a real dataset


def flwr_dirichlet_reference(
    labels: np.ndarray,
    num_classes: int,
    num_clients: int,
    alpha: float,
    seed: int,
    self_balancing: bool,
    min_partition_size: int,
) -> list[np.ndarray]:
    """flwr-datasets 0.6's DirichletPartitioner._determine_partition_id_to_indices_if_needed, transcribed
    (dicts of lists, per-class np.split at int(cumsum * n)), with two documented differences: the class's
    samples are shuffled before the cut, and the generator is the trainer's (seed, tag) stream."""
    rng = np.random.default_rng([seed, TAG_DIRICHLET])
    average = len(labels) / num_clients
    for _attempt in range(11):
        parts: dict[int, list[int]] = {nid: [] for nid in range(num_clients)}
        for k in range(num_classes):
            indices_k = rng.permutation(np.nonzero(labels == k)[0])
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            share = {nid: proportions[nid] for nid in range(num_clients)}
            if self_balancing:
                for nid in share.copy():
                    if len(parts[nid]) > average:
                        share[nid] = 0
                total = sum(share.values())
                share = {nid: p / total for nid, p in share.items()}
            cuts = (np.cumsum(list(share.values())) * len(indices_k)).astype(int)[:-1]
            for nid, piece in enumerate(np.split(indices_k, cuts)):
                parts[nid].extend(piece.tolist())
        if min(len(v) for v in parts.values()) >= min_partition_size:
            return [np.sort(np.array(parts[nid], dtype=np.int64)) for nid in range(num_clients)]
    raise ValueError("The max number of attempts (10) was reached.")


@pytest.mark.parametrize("self_balancing", [False, True])
@pytest.mark.parametrize("min_size", [1, 10])
@pytest.mark.parametrize("seed", [0, 3])
def test_dirichlet_options_match_flwr_datasets_algorithm(self_balancing: bool, min_size: int, seed: int) -> None:
    labels = long_tailed_labels()
    expected = flwr_dirichlet_reference(labels, 10, 30, 0.5, seed, self_balancing, min_size)
    got = partition_indices(
        labels, 10, 30, "dirichlet", 0.5, seed, self_balancing=self_balancing, min_partition_size=min_size
    )
    assert len(got) == 30
    for mine, theirs in zip(got, expected):
        np.testing.assert_array_equal(mine, theirs)
    assert min(len(p) for p in got) >= min_size
    assert np.array_equal(np.sort(np.concatenate(got)), np.arange(len(labels)))


def test_default_dirichlet_is_the_first_flwr_draw_when_no_client_is_empty() -> None:
    labels = long_tailed_labels()
    expected = flwr_dirichlet_reference(labels, 10, 8, 0.5, 1, False, 0)
    assert min(len(p) for p in expected) > 0
    got = partition_indices(labels, 10, 8, "dirichlet", 0.5, 1)
    for mine, theirs in zip(got, expected):
        np.testing.assert_array_equal(mine, theirs)


def test_min_partition_size_redraws_where_the_default_moves_samples() -> None:
    labels = long_tailed_labels()
    first = flwr_dirichlet_reference(labels, 10, 100, 0.5, 0, False, 0)
    assert min(len(p) for p in first) == 0, "the setting must leave a client empty on the first draw"
    default = partition_indices(labels, 10, 100, "dirichlet", 0.5, 0)
    redrawn = partition_indices(labels, 10, 100, "dirichlet", 0.5, 0, min_partition_size=1)
    np.testing.assert_array_equal(
        np.concatenate(redrawn), np.concatenate(flwr_dirichlet_reference(labels, 10, 100, 0.5, 0, False, 1))
    )
    assert min(len(p) for p in default) >= 1 and min(len(p) for p in redrawn) >= 1
    assert any(not np.array_equal(a, b) for a, b in zip(default, redrawn))


def test_self_balancing_caps_the_largest_client() -> None:
    labels = long_tailed_labels()
    for seed in range(3):
        plain = partition_indices(labels, 10, 20, "dirichlet", 0.2, seed)
        balanced = partition_indices(labels, 10, 20, "dirichlet", 0.2, seed, self_balancing=True)
        average = len(labels) / 20
        # A client stops receiving once above the average; it can overshoot by at most one class's share.
        assert max(len(p) for p in balanced) <= average + max(np.bincount(labels))
        assert max(len(p) for p in balanced) < max(len(p) for p in plain)


def test_unreachable_min_partition_size_is_a_data_error_naming_the_keys() -> None:
    labels = np.arange(100) % 10
    with pytest.raises(DataError, match=r"partition\.min_partition_size.*partition\.alpha"):
        partition_indices(labels, 10, 10, "dirichlet", 0.001, 0, min_partition_size=10)
    with pytest.raises(DataError, match=r"min_partition_size = 11 needs"):
        partition_indices(labels, 10, 10, "dirichlet", 0.5, 0, min_partition_size=11)


def mcmahan_shards_reference(
    labels: np.ndarray, num_clients: int, shards_per_client: int, seed: int
) -> list[np.ndarray]:
    """McMahan et al.'s pathological split written out: sort by label, cut into equal consecutive shards (the
    first total % shards one larger), client i takes the i-th run of shards_per_client of a permutation."""
    order = sorted(range(len(labels)), key=lambda i: (labels[i], i))
    num_shards = num_clients * shards_per_client
    shards, position = [], 0
    for s in range(num_shards):
        size = len(labels) // num_shards + (1 if s < len(labels) % num_shards else 0)
        shards.append(order[position : position + size])
        position += size
    permutation = np.random.default_rng([seed, TAG_SHARDS]).permutation(num_shards)
    clients = []
    for i in range(num_clients):
        mine = [index for j in permutation[i * shards_per_client : (i + 1) * shards_per_client] for index in shards[j]]
        clients.append(np.array(sorted(mine), dtype=np.int64))
    return clients


@pytest.mark.parametrize("num_clients,shards_per_client", [(20, 2), (7, 3), (30, 1)])
def test_shards_match_the_mcmahan_reference(num_clients: int, shards_per_client: int) -> None:
    labels = long_tailed_labels()
    got = partition_indices(labels, 10, num_clients, "shards", 0.5, 5, shards_per_client=shards_per_client)
    expected = mcmahan_shards_reference(labels, num_clients, shards_per_client, 5)
    for mine, theirs in zip(got, expected):
        np.testing.assert_array_equal(mine, theirs)
    assert np.array_equal(np.sort(np.concatenate(got)), np.arange(len(labels)))


def test_shards_in_the_papers_setting_give_each_client_at_most_two_classes() -> None:
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 600))  # 6000 balanced, 100 clients
    parts = partition_indices(labels, 10, 100, "shards", 0.5, 0, shards_per_client=2)
    assert all(len(p) == 60 for p in parts)  # 200 shards of 30
    assert max(len(np.unique(labels[p])) for p in parts) <= 2
    assert np.mean([len(np.unique(labels[p])) for p in parts]) > 1.5  # most clients get two classes


def test_too_many_shards_is_a_data_error() -> None:
    with pytest.raises(DataError, match="partition.shards_per_client"):
        partition_indices(np.arange(30) % 3, 3, 10, "shards", 0.5, 0, shards_per_client=4)


def test_partition_keys_are_config_keys(repo) -> None:
    cfg = load_config(
        repo / "configs" / "smoke.toml",
        [
            "partition.method=shards",
            "partition.shards_per_client=3",
            "partition.self_balancing=true",
            "partition.min_partition_size=2",
        ],
    )
    assert (cfg.partition.method, cfg.partition.shards_per_client) == ("shards", 3)
    assert cfg.partition.self_balancing and cfg.partition.min_partition_size == 2
    with pytest.raises(ConfigError, match="shards_per_client"):
        load_config(repo / "configs" / "smoke.toml", ["partition.shards_per_client=0"])
    with pytest.raises(ConfigError, match="on_demand"):
        load_config(repo / "configs" / "smoke.toml", ["data.synthetic_mode=on_demand", "partition.method=shards"])
