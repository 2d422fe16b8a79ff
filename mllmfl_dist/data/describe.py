"""What a run's client data look like: one line for the log, and the per-client class histogram that rank
0 writes to ``<run dir>/federated/partition.json`` (the report plots it)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import Config
from .base import ClientData


def client_sizes(data: ClientData) -> np.ndarray:
    return np.fromiter((data.client_size(c) for c in range(data.num_clients)), dtype=np.int64, count=data.num_clients)


def describe_data(cfg: Config, data: ClientData) -> str:
    """``data: shards, 10 classes, 3416 training images (per class 1000 598 ... 10), 1000 test images; 20
    clients (dirichlet alpha 0.5) of 1/127/530 images (min/median/max)``."""
    counts = data.train_class_counts()
    sizes = client_sizes(data)
    part = cfg.partition
    how = {
        "dirichlet": f"dirichlet alpha {part.alpha:g}"
        + (", self-balancing" if part.self_balancing else "")
        + (f", min size {part.min_partition_size}" if part.min_partition_size else ""),
        "creff": f"creff alpha {part.alpha:g}",
        "iid": "iid",
        "shards": f"shards, {part.shards_per_client} per client",
    }[part.method]
    val_images = len(data.val_set()[1])
    val = f", {val_images} validation images" if val_images else ""
    shown = " ".join(map(str, counts)) if len(counts) <= 20 else f"max {max(counts)}, min {min(counts)}"
    return (
        f"data: {cfg.data.source}, {data.num_classes} classes, {sum(counts)} training images (per class "
        f"{shown}), {len(data.test_set()[1])} test images{val}; {data.num_clients} clients ({how}) of "
        f"{sizes.min()}/{int(np.median(sizes))}/{sizes.max()} images (min/median/max)"
    )


def partition_record(cfg: Config, data: ClientData) -> dict[str, Any]:
    """partition.json: the partition's settings, each client's size and class histogram ``class_counts[client][class]``
    (``null`` where clients are generated on demand and hold no fixed samples), and the class names."""
    counts = data.client_class_counts()
    return {
        "partition": {
            "method": cfg.partition.method,
            "alpha": cfg.partition.alpha,
            "self_balancing": cfg.partition.self_balancing,
            "min_partition_size": cfg.partition.min_partition_size,
            "shards_per_client": cfg.partition.shards_per_client,
        },
        "seed": cfg.run.seed,
        "num_clients": data.num_clients,
        "class_names": list(data.class_names),
        "train_class_counts": list(data.train_class_counts()),
        "client_sizes": client_sizes(data).tolist(),
        "class_counts": None if counts is None else counts.tolist(),
    }
