"""Split a labeled training set among clients: Dirichlet label skew (plain and CReFF variant) and IID.

Every partitioner first computes ``client_of[i]``, the client of sample ``i``, with vectorised numpy,
and :func:`_group` turns that into one index array per client. That keeps 100,000 clients cheap: the
only per-client Python loop is the CReFF variant's, whose per-client work is a few small numpy calls.
"""

from __future__ import annotations

import numpy as np

from .base import DataError

METHODS = ("dirichlet", "creff", "iid")

# Distinct RNG stream tags, so no two uses of the same seed share random numbers.
_TAG_DIRICHLET = 101
_TAG_CREFF_MIX = 102
_TAG_CREFF_DRAW = 103
_TAG_CREFF_POOL = 104
_TAG_IID = 105

# CReFF mixes are drawn in blocks of this many clients: fewer numpy calls than one per client, bounded
# memory for 100,000 clients x 1,000 classes. Part of the random stream, so changing it changes results.
_MIX_BLOCK = 1024


def partition_indices(
    labels: np.ndarray, num_classes: int, num_clients: int, method: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """Indices (into ``labels``) of each client's samples, ascending within a client.

    Every index is used exactly once and every client gets at least one sample. The result depends
    only on the arguments.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if method not in METHODS:
        raise DataError(f"partition.method = {method!r} is not known; choose one of: {', '.join(METHODS)}")
    if method != "iid" and not alpha > 0:
        raise DataError(f"partition.alpha = {alpha!r} is not allowed; it must be > 0")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), found [{labels.min()}, {labels.max()}]")
    if len(labels) < num_clients:
        raise DataError(
            f"{len(labels)} training samples cannot give each of {num_clients} clients one sample; "
            "lower federated.num_clients or raise data.imb_factor"
        )
    if method == "dirichlet":
        client_of = _dirichlet_clients(labels, num_classes, num_clients, alpha, seed)
    elif method == "creff":
        client_of = _creff_clients(labels, num_classes, num_clients, alpha, seed)
    else:
        client_of = _iid_clients(len(labels), num_clients, seed)
    return _group(client_of, num_clients)


def _group(client_of: np.ndarray, num_clients: int) -> list[np.ndarray]:
    # A stable sort by client leaves each client's indices ascending.
    order = np.argsort(client_of, kind="stable")
    sizes = np.bincount(client_of, minlength=num_clients)
    return np.split(order, np.cumsum(sizes)[:-1])


def _equal_sizes(num_samples: int, num_clients: int) -> np.ndarray:
    sizes = np.full(num_clients, num_samples // num_clients, dtype=np.int64)
    sizes[: num_samples % num_clients] += 1
    return sizes


def _iid_clients(num_samples: int, num_clients: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, _TAG_IID])
    client_of = np.empty(num_samples, dtype=np.int64)
    client_of[rng.permutation(num_samples)] = np.repeat(np.arange(num_clients), _equal_sizes(num_samples, num_clients))
    return client_of


def _dirichlet_clients(labels: np.ndarray, num_classes: int, num_clients: int, alpha: float, seed: int) -> np.ndarray:
    """Plain per-class Dirichlet: each class is cut among the clients by proportions ~ Dir(alpha)."""
    rng = np.random.default_rng([seed, _TAG_DIRICHLET])
    client_of = np.empty(len(labels), dtype=np.int64)
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        bounds = np.minimum(np.floor(np.cumsum(proportions) * len(members)).astype(np.int64), len(members))
        bounds[-1] = len(members)  # the float cumsum may end just below 1
        counts = np.diff(bounds, prepend=0)
        client_of[members] = np.repeat(np.arange(num_clients), counts)
    _fill_empty_clients(client_of, num_clients, rng)
    return client_of


def _fill_empty_clients(client_of: np.ndarray, num_clients: int, rng: np.random.Generator) -> None:
    """Give every empty client one sample taken from the largest clients (in place).

    The sizes match moving one sample at a time from the currently largest client (ties: lowest id),
    but are computed in one step; which of a donor's samples move is random, so the donors do not
    lose a particular class.
    """
    sizes = np.bincount(client_of, minlength=num_clients)
    empty = np.flatnonzero(sizes == 0)
    if len(empty) == 0:
        return
    give = _donations(sizes, len(empty))
    # Rank each donor's samples in a random order; its first give[k] samples move.
    order = np.lexsort((rng.random(len(client_of)), client_of))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    owner = client_of[order]
    rank = np.arange(len(order)) - starts[owner]
    moved = order[rank < give[owner]]
    client_of[moved] = empty


def _donations(sizes: np.ndarray, wanted: int) -> np.ndarray:
    """How many samples each client gives so that ``wanted`` samples come off the largest clients.

    Repeatedly taking one from the largest client ends with every client above some level T cut to T,
    and the remaining few taken from the lowest-id clients at level T. Find T by bisection on
    ``excess(T) = sum(max(0, size - T))``, which falls as T grows. Needs ``sizes.sum() >= len(sizes)``,
    so that T >= 1 and no donor is emptied.
    """

    def excess(level: int) -> int:
        return int(np.maximum(sizes - level, 0).sum())

    low, high = 1, int(sizes.max())
    while low < high:  # smallest level with excess(level) <= wanted
        mid = (low + high) // 2
        if excess(mid) <= wanted:
            high = mid
        else:
            low = mid + 1
    give = np.maximum(sizes - low, 0)
    remainder = wanted - int(give.sum())
    give[np.flatnonzero(sizes >= low)[:remainder]] += 1
    return give


def _creff_clients(labels: np.ndarray, num_classes: int, num_clients: int, alpha: float, seed: int) -> np.ndarray:
    """Equal-size clients whose class mixes are drawn from Dir(alpha) over the classes.

    Each client's counts are a multinomial draw on its mix restricted to the classes with samples
    left (renormalised), repeated until the client is full; samples come from shuffled class pools
    without replacement, so the whole set is used exactly once.
    """
    mix_rng = np.random.default_rng([seed, _TAG_CREFF_MIX])
    draw_rng = np.random.default_rng([seed, _TAG_CREFF_DRAW])
    pool_rng = np.random.default_rng([seed, _TAG_CREFF_POOL])
    sizes = _equal_sizes(len(labels), num_clients)
    remaining = np.bincount(labels, minlength=num_classes).astype(np.int64)

    # One (client, class, count) entry per nonzero count; entries are in client order.
    entry_client: list[np.ndarray] = []
    entry_class: list[np.ndarray] = []
    entry_count: list[np.ndarray] = []
    for block_start in range(0, num_clients, _MIX_BLOCK):
        block = min(_MIX_BLOCK, num_clients - block_start)
        mixes = mix_rng.dirichlet(np.full(num_classes, alpha), size=block)
        for offset in range(block):
            client = block_start + offset
            counts = _draw_client_counts(mixes[offset], int(sizes[client]), remaining, draw_rng)
            classes = np.flatnonzero(counts)
            entry_client.append(np.full(len(classes), client, dtype=np.int64))
            entry_class.append(classes)
            entry_count.append(counts[classes])
    clients = np.concatenate(entry_client)
    classes = np.concatenate(entry_class)
    counts = np.concatenate(entry_count)

    # Shuffled class pools laid end to end in class order; entries take consecutive runs of their pool.
    pool = np.concatenate([pool_rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)])
    # Sorted by (class, client), the running count is exactly the entry's start in the pool, because
    # each class's entries together use up its whole pool.
    by_class = np.argsort(classes, kind="stable")
    pool_start = np.empty_like(counts)
    pool_start[by_class] = np.cumsum(counts[by_class]) - counts[by_class]

    sample_entry = np.repeat(np.arange(len(counts)), counts)
    entry_first = np.cumsum(counts) - counts
    position = pool_start[sample_entry] + (np.arange(len(sample_entry)) - entry_first[sample_entry])
    client_of = np.empty(len(labels), dtype=np.int64)
    client_of[pool[position]] = clients[sample_entry]
    return client_of


def _draw_client_counts(
    mix: np.ndarray, size: int, remaining: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Per-class counts of one client (``size`` in total); takes them out of ``remaining`` in place."""
    counts = np.zeros_like(remaining)
    need = size
    while need > 0:
        weights = np.where(remaining > 0, mix, 0.0)
        total = weights.sum()
        # A tiny alpha can put all of the mix on exhausted classes; then follow what is left.
        probs = weights / total if total > 0 else remaining / remaining.sum()
        take = np.minimum(rng.multinomial(need, probs), remaining)
        remaining -= take
        counts += take
        need -= int(take.sum())
    return counts
