"""Client data: sources, the long tail, partitioners, and batched augmentation (DESIGN.md "Data")."""

from .augment import augment_batch, normalize
from .base import ClientData, DataError
from .build import build_client_data
from .longtail import longtail_counts, longtail_indices
from .partition import partition_indices

__all__ = [
    "build_client_data",
    "ClientData",
    "DataError",
    "augment_batch",
    "normalize",
    "longtail_counts",
    "longtail_indices",
    "partition_indices",
]
