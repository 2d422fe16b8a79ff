"""Which clients train in a round, and which rank hosts each: functions of (seed, round) only."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mllmfl_dist.core.seeds import TAG_SAMPLING


def sample_clients(seed: int, round_index: int, num_clients: int, clients_per_round: int) -> list[int]:
    """K distinct client ids out of N, seeded by (seed, round); sorted for readability of logs."""
    rng = np.random.default_rng([seed, TAG_SAMPLING, round_index])
    chosen = rng.choice(num_clients, size=clients_per_round, replace=False)
    return sorted(int(c) for c in chosen)


def assign_clients(client_ids: Sequence[int], sizes: Sequence[int], hosts: Sequence[int]) -> dict[int, list[int]]:
    """Balanced, deterministic assignment of clients to host ranks.

    Longest-processing-time first: clients in order of decreasing sample count (ties by id) go to the
    host with the least work so far (ties by rank). Long-tailed non-IID clients differ in size by orders
    of magnitude, so balancing by count alone would leave one host waiting for the other.
    """
    load = {host: 0 for host in hosts}
    plan: dict[int, list[int]] = {host: [] for host in hosts}
    for cid, size in sorted(zip(client_ids, sizes), key=lambda item: (-item[1], item[0])):
        host = min(hosts, key=lambda h: (load[h], h))
        plan[host].append(cid)
        load[host] += size
    for host in plan:
        plan[host].sort()
    return plan


def client_groups(client_ids: Sequence[int], sizes: Sequence[int], group_size: int) -> list[tuple[int, ...]]:
    """The round's clients in groups of at most ``group_size`` for vectorized training (fl/vectorized.py).

    Consecutive runs of the clients in order of decreasing sample count (ties by id): a group's clients take
    about as many steps, with batches of the same sizes, so a group needs few stacked steps (one per step and
    distinct batch size). A function of the round's clients only, never of the hosts: each group is then
    trained whole on one host (:func:`assign_clients` over the groups, weighed by their samples), so every world
    size computes the same groups the same way. Groups differ in work (the first holds the largest clients),
    so hosts balance only when each gets several: choose ``group_size`` at most about
    ``clients_per_round / (2 x hosts)``.
    """
    ordered = [cid for cid, _ in sorted(zip(client_ids, sizes), key=lambda item: (-item[1], item[0]))]
    return [tuple(ordered[i : i + group_size]) for i in range(0, len(ordered), group_size)]
