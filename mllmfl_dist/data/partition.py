"""Split a labeled training set among clients: Dirichlet label skew (plain and CReFF variant), IID, shards.

- ``dirichlet``: each class is cut among all clients by proportions ~ Dir(alpha); an empty client
  takes one sample from the largest. This is flwr-datasets' ``DirichletPartitioner`` (Flower Datasets
  0.6; Hsu et al. 2019): per class ``p ~ Dir(alpha)``, cut points ``int(cumsum(p) * n)``; with its
  options ``self_balancing`` (``partition.self_balancing``: a client already holding more than
  ``total / N`` samples gets no share of the next classes) and ``min_partition_size``
  (``partition.min_partition_size``: every class is drawn again until each client holds at least that
  many samples; after 11 draws, flwr's limit, it is a DataError). Our default, ``min_partition_size = 0``
  with self-balancing off, draws once and then moves one sample from the largest client to each empty one,
  where flwr (``min_partition_size >= 1``) would draw again: the two agree on every draw that leaves no
  client empty. Two further differences do not change the distribution: the samples of a class are
  shuffled before the cut (flwr cuts them in dataset order) and the random stream is ours, seeded by
  ``(seed, tag)``, so the same seed gives other draws than flwr's ``np.random.default_rng(seed)``.
- ``shards``: the pathological non-IID split of McMahan et al. (2017): the samples sorted by label
  (stable), cut into ``N * shards_per_client`` consecutive shards of equal size (the first ``total %
  shards`` one larger, so every sample is used; flwr-datasets' ``ShardPartitioner`` drops that remainder),
  and each client gets ``shards_per_client`` shards drawn without replacement (client i the i-th run of a
  random permutation of the shards, as flwr does).
- ``creff``: follows CReFF's released partition (Shang et al., IJCAI 2022; also used by CLIP2FL):
  FedDF's ``build_non_iid_by_dirichlet`` (shuffle, split the clients into groups of 10 "auxiliary
  workers" with proportional chunks of the samples, per class Dir(alpha) over a group's workers with
  full workers left out, redrawn until the smallest worker has half its share), then
  ``partition_balance`` (the workers' lists, concatenated, cut into equal consecutive pieces), so the
  clients are equal in size within one. See :func:`_creff_clients`.
- ``iid``: a random permutation cut into equal pieces.

Every partitioner first computes ``client_of[i]``, the client of sample ``i``, with vectorised numpy,
and :func:`_group` turns that into one index array per client. That keeps 100,000 clients cheap: there
is no per-client Python loop; the CReFF variant loops over classes (and redraws), each step one numpy
call over a whole block of groups.
"""

from __future__ import annotations

import numpy as np

from ..config.fields import choices_of
from ..config.schema import PartitionConfig
from ..core.seeds import TAG_CREFF_SHUFFLE, TAG_CREFF_SPLIT, TAG_DIRICHLET, TAG_IID, TAG_SHARDS
from .base import DataError

METHODS = choices_of(PartitionConfig, "method")  # the schema's list, the one home of the names

# Draws of the plain Dirichlet partition before min_partition_size is given up: flwr-datasets' limit (the
# first draw and 10 more).
_DIRICHLET_DRAWS = 11

# CReFF (FedDF) splits the workers into groups of this many ("auxiliary workers").
_CREFF_GROUP = 10
# Redraws of a group before giving up on FedDF's minimum-size condition.
_CREFF_ATTEMPTS = 10_000
# CReFF groups are drawn together in blocks of about this many (group, class, worker) counts: few numpy
# calls for 100,000 clients, bounded memory for many classes. Part of the random stream.
_CREFF_BLOCK = 1 << 22


def partition_indices(
    labels: np.ndarray,
    num_classes: int,
    num_clients: int,
    method: str,
    alpha: float,
    seed: int,
    *,
    self_balancing: bool = False,
    min_partition_size: int = 0,
    shards_per_client: int = 2,
) -> list[np.ndarray]:
    """Indices (into ``labels``) of each client's samples, ascending within a client.

    Every index is used exactly once and every client gets at least one sample. The result depends
    only on the arguments. ``self_balancing`` and ``min_partition_size`` apply to ``dirichlet``,
    ``shards_per_client`` to ``shards``. Raises DataError for a split the data cannot give.
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
        if min_partition_size * num_clients > len(labels):
            raise DataError(
                f"partition.min_partition_size = {min_partition_size} needs {min_partition_size} x "
                f"{num_clients} clients = {min_partition_size * num_clients} training samples, there are "
                f"{len(labels)}; lower it or federated.num_clients"
            )
        client_of = _dirichlet_clients(
            labels, num_classes, num_clients, alpha, seed, self_balancing, min_partition_size
        )
    elif method == "shards":
        client_of = _shard_clients(labels, num_clients, shards_per_client, seed)
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
    rng = np.random.default_rng([seed, TAG_IID])
    client_of = np.empty(num_samples, dtype=np.int64)
    client_of[rng.permutation(num_samples)] = np.repeat(np.arange(num_clients), _equal_sizes(num_samples, num_clients))
    return client_of


def _dirichlet_clients(
    labels: np.ndarray,
    num_classes: int,
    num_clients: int,
    alpha: float,
    seed: int,
    self_balancing: bool = False,
    min_size: int = 0,
) -> np.ndarray:
    """Plain per-class Dirichlet: each class is cut among the clients by proportions ~ Dir(alpha), classes
    in order; with ``self_balancing`` a client above the average size gets no share of later classes; all
    classes are drawn again until every client holds ``min_size`` samples (at most ``_DIRICHLET_DRAWS``
    draws). The draws continue one random stream, so the first draw is the same whatever the options."""
    rng = np.random.default_rng([seed, TAG_DIRICHLET])
    average = len(labels) / num_clients
    for _ in range(_DIRICHLET_DRAWS):
        client_of = np.empty(len(labels), dtype=np.int64)
        sizes = np.zeros(num_clients, dtype=np.int64)
        for c in range(num_classes):
            members = rng.permutation(np.flatnonzero(labels == c))
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            if self_balancing:
                open_clients = sizes <= average  # someone always is: the sizes sum to at most the total
                proportions = np.where(open_clients, proportions, 0.0)
                total = np.cumsum(proportions)[-1]  # summed left to right as flwr does: the same cut points
                # A tiny alpha can leave every open client's share at exactly 0.0 (float underflow), where flwr
                # would divide by zero: the class then goes to the open clients in equal parts.
                proportions = proportions / total if total > 0 else open_clients / open_clients.sum()
            bounds = np.minimum(np.floor(np.cumsum(proportions) * len(members)).astype(np.int64), len(members))
            bounds[-1] = len(members)  # the float cumsum may end just below 1 (flwr: the last split's rest)
            counts = np.diff(bounds, prepend=0)
            client_of[members] = np.repeat(np.arange(num_clients), counts)
            sizes += counts
        if sizes.min() >= min_size:
            break
    else:
        raise DataError(
            f"dirichlet partition: after {_DIRICHLET_DRAWS} draws a client still holds "
            f"{int(sizes.min())} < partition.min_partition_size = {min_size} samples; raise "
            f"partition.alpha (now {alpha}) or lower partition.min_partition_size or "
            f"federated.num_clients"
        )
    _fill_empty_clients(client_of, num_clients, rng)
    return client_of


def _shard_clients(labels: np.ndarray, num_clients: int, shards_per_client: int, seed: int) -> np.ndarray:
    """McMahan et al.'s shards: label-sorted samples cut into ``num_clients * shards_per_client`` equal
    consecutive shards (sizes within one), each client ``shards_per_client`` of them at random."""
    num_shards = num_clients * shards_per_client
    if num_shards > len(labels):
        raise DataError(
            f"partition.method = 'shards': {num_clients} clients x partition.shards_per_client = "
            f"{shards_per_client} shards need at least {num_shards} training samples, there are "
            f"{len(labels)}; lower partition.shards_per_client or federated.num_clients"
        )
    rng = np.random.default_rng([seed, TAG_SHARDS])
    by_label = np.argsort(labels, kind="stable")
    shard_of_position = np.repeat(np.arange(num_shards), _equal_sizes(len(labels), num_shards))
    owner = np.empty(num_shards, dtype=np.int64)
    owner[rng.permutation(num_shards)] = np.arange(num_shards) // shards_per_client
    client_of = np.empty(len(labels), dtype=np.int64)
    client_of[by_label] = owner[shard_of_position]
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
    """CReFF's released partition: FedDF's Dirichlet over groups of 10 workers, then equal cuts.

    1. Shuffle the samples.
    2. Split the ``N = num_clients`` workers into groups of ``_CREFF_GROUP`` (the last one takes the
       remainder; one group of N if N is smaller) and the shuffled samples into consecutive chunks in
       proportion, ``chunk = int(group_size / N * total)`` (computed exactly in integers; the released
       code's float product can land one lower), the last chunk taking the rest.
    3. Within a group of g workers, class by class: proportions ~ Dir(alpha * ones(g)), zeroed for every
       worker already holding ``>= chunk / g`` samples and renormalised; the class's samples in the
       chunk are cut by the cumulative proportions (``floor(cumsum * n)``, the last worker with a share
       taking the rest) and appended to the workers. All classes are redrawn until the smallest worker
       holds ``>= int(0.5 * chunk / g)`` samples (FedDF's condition). The condition is checked after at
       least one draw (the released loop never runs when that minimum is 0, i.e. chunks under 2g
       samples, and reuses the previous group's lists); after ``_CREFF_ATTEMPTS`` draws it is a
       DataError (the released code loops on).
    4. The workers' lists (each in class order), concatenated in worker order, are cut into N
       consecutive pieces of equal size (the first ``total % N`` one larger): CReFF's
       ``partition_balance``. Client i gets piece i.

    Groups are independent, so all groups of a block are drawn at once, one class at a time.
    """
    shuffle_rng = np.random.default_rng([seed, TAG_CREFF_SHUFFLE])
    split_rng = np.random.default_rng([seed, TAG_CREFF_SPLIT])
    total = len(labels)

    num_groups = -(-num_clients // _CREFF_GROUP)
    group_workers = np.full(num_groups, _CREFF_GROUP, dtype=np.int64)
    group_workers[-1] = num_clients - _CREFF_GROUP * (num_groups - 1)
    chunk_sizes = group_workers * total // num_clients
    chunk_sizes[-1] = total - chunk_sizes[:-1].sum()
    first_worker = np.cumsum(group_workers) - group_workers
    first_sample = np.cumsum(chunk_sizes) - chunk_sizes

    position_sample = shuffle_rng.permutation(total)  # shuffled position -> sample index
    position_label = labels[position_sample]
    group_class = np.repeat(np.arange(num_groups), chunk_sizes) * num_classes + position_label
    # Positions sorted by (group, class, position); each (group, class) run is cut among the group's workers.
    by_group_class = np.argsort(group_class, kind="stable")
    counts = np.bincount(group_class, minlength=num_groups * num_classes).reshape(num_groups, num_classes)

    worker_sorted = np.empty(total, dtype=np.int64)  # worker of each position, in by_group_class order
    block = max(1, _CREFF_BLOCK // (num_classes * _CREFF_GROUP))
    for start, stop in _blocks_of_equal_groups(group_workers, block):
        workers = int(group_workers[start])
        cut = _dirichlet_groups(counts[start:stop], workers, alpha, split_rng)  # [groups, classes, workers]
        worker_ids = first_worker[start:stop, None, None] + np.arange(workers)
        begin, end = first_sample[start], first_sample[stop - 1] + chunk_sizes[stop - 1]
        worker_sorted[begin:end] = np.repeat(np.broadcast_to(worker_ids, cut.shape).ravel(), cut.ravel())

    # Each worker's list in class order (positions ascending within a class), workers in order.
    classes_sorted = position_label[by_group_class]
    by_worker_class = np.argsort(worker_sorted * num_classes + classes_sorted, kind="stable")
    concatenated = position_sample[by_group_class[by_worker_class]]
    client_of = np.empty(total, dtype=np.int64)
    client_of[concatenated] = np.repeat(np.arange(num_clients), _equal_sizes(total, num_clients))
    return client_of


def _blocks_of_equal_groups(group_workers: np.ndarray, block: int) -> list[tuple[int, int]]:
    """Consecutive ranges of at most ``block`` groups with the same worker count."""
    ranges = []
    change = np.flatnonzero(np.diff(group_workers)) + 1
    edges = np.concatenate([[0], change, [len(group_workers)]])
    for low, high in zip(edges[:-1], edges[1:]):
        ranges += [(int(s), int(min(s + block, high))) for s in range(low, high, block)]
    return ranges


def _dirichlet_groups(counts: np.ndarray, workers: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """FedDF's per-group Dirichlet split, for many groups of ``workers`` workers at once.

    ``counts[k, c]`` is how many samples of class c group k holds; returns ``[k, c, j]``, how many of
    them worker j gets. A group is redrawn whole until its smallest worker has ``chunk // (2 * workers)``
    samples, ``chunk`` being the group's sample count.
    """
    chunk = counts.sum(axis=1)
    min_size = chunk // (2 * workers)  # == int(0.5 * chunk / workers)
    result = np.empty((*counts.shape, workers), dtype=np.int64)
    todo = np.arange(len(counts))
    for _ in range(_CREFF_ATTEMPTS):
        cut = _dirichlet_groups_once(counts[todo], chunk[todo], workers, alpha, rng)
        done = cut.sum(axis=1).min(axis=1) >= min_size[todo]
        result[todo[done]] = cut[done]
        todo = todo[~done]
        if len(todo) == 0:
            return result
    raise DataError(
        f"creff partition: after {_CREFF_ATTEMPTS} Dirichlet draws a group of {workers} clients "
        f"({int(chunk[todo[0]])} samples) still has a client below {int(min_size[todo[0]])} samples "
        f"(half its share); raise partition.alpha (now {alpha}) or lower federated.num_clients"
    )


def _dirichlet_groups_once(
    counts: np.ndarray, chunk: np.ndarray, workers: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """One draw of every class for each group (rows of ``counts``); see :func:`_dirichlet_groups`.

    Only the groups holding samples of a class draw for it: a class with no samples there changes
    nothing, so skipping it keeps the distribution and makes tiny chunks (many clients) cheap.
    """
    groups, num_classes = counts.shape
    sizes = np.zeros((groups, workers), dtype=np.int64)
    cut = np.zeros((groups, num_classes, workers), dtype=np.int64)
    later_workers = np.arange(workers)
    for c in range(num_classes):
        rows = np.flatnonzero(counts[:, c])
        if len(rows) == 0:
            continue
        # Dirichlet as normalised Gamma(alpha) draws, taken in logs (Gamma(a) = Gamma(a + 1) * U ** (1 / a))
        # so that a tiny alpha cannot underflow every weight of a row to zero.
        log_weights = np.log(rng.standard_gamma(alpha + 1.0, size=(len(rows), workers)))
        log_weights += np.log1p(-rng.random((len(rows), workers))) / alpha
        # Full workers (>= chunk / workers samples) get nothing. A group with samples of this class left
        # has a worker that is not full (all full would mean all its samples are placed), so every row
        # keeps a finite maximum.
        log_weights[sizes[rows] * workers >= chunk[rows, None]] = -np.inf
        weights = np.exp(log_weights - log_weights.max(axis=1, keepdims=True))
        proportions = weights / weights.sum(axis=1, keepdims=True)
        cumulative = np.cumsum(proportions, axis=1)
        # From the last worker with a share on, the cut is the class's end: a float sum just below 1 must
        # not hand a sample to a full worker after it.
        last_open = workers - 1 - np.argmax(proportions[:, ::-1] > 0, axis=1)
        cumulative[later_workers >= last_open[:, None]] = 1.0
        n = counts[rows, c : c + 1]
        bounds = np.minimum(np.floor(cumulative * n).astype(np.int64), n)
        taken = np.diff(bounds, axis=1, prepend=0)
        cut[rows, c] = taken
        sizes[rows] += taken
    return cut
