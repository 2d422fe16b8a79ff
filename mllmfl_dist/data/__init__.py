"""Client data: sources, long tail, partitioners, WebDataset shards, batched augmentation (DESIGN.md "Data")."""

from .augment import apply_augmentation, augment_batch, normalize
from .base import ArrayClientData, ClientData, DataError
from .build import build_client_data
from .longtail import longtail_counts, longtail_indices
from .partition import partition_indices
from .images import CorruptImageError, decode_image
from .shards import (
    ShardError,
    expand_shards,
    iter_samples,
    read_labeled_shards,
    write_shards,
)

__all__ = [
    "build_client_data",
    "ClientData",
    "ArrayClientData",
    "DataError",
    "augment_batch",
    "apply_augmentation",
    "normalize",
    "longtail_counts",
    "longtail_indices",
    "partition_indices",
    "write_shards",
    "expand_shards",
    "iter_samples",
    "decode_image",
    "read_labeled_shards",
    "ShardError",
    "CorruptImageError",
]
