"""Every random stream of a run is ``derive_seed(run.seed, TAG, ...)``: one table of the tags, so no two uses
share a stream by accident and a new use takes a free number.

A stream is a function of integer keys only, such as (seed, tag, round, client id), never of the rank, so the
same config gives the same numbers whatever the world size. A strategy plugin takes its tags from
:data:`PLUGIN_TAGS` upwards.
"""

from __future__ import annotations

import numpy as np
import torch

# -- the round loop -------------------------------------------------------------------------------------------
TAG_SAMPLING = 1  # which clients a round samples (seed, round)
TAG_CLIENT_TRAINING = 2  # a client's data order and augmentation (seed, round, client)
TAG_MODEL_INIT = 3  # the FL model's initial weights (seed)
TAG_LONGTAIL = 4  # which samples of each class the long tail keeps (seed)
# -- stage 1 and 3 --------------------------------------------------------------------------------------------
TAG_PRETRAIN_ORDER = 11  # DWP's data order (seed, epoch)
TAG_ADAPTER_INIT = 12  # DWP's token adapter's initial weights (seed)
TAG_ANNOTATE = 13  # sampled decoding of annotation (seed, shard)
TAG_ALIGN = 14  # alignment's batch order (seed, round)
TAG_DP_NOISE = 15  # central DP's Gaussian noise on the summed updates (seed, round)
# -- strategies -----------------------------------------------------------------------------------------------
TAG_CREFF_FEATURES = 21  # CReFF's federated features' initial values (seed)
TAG_CREFF_RETRAIN = 22  # CReFF's re-trained classifier's init and batch order (seed, round)
TAG_CLIENT_UPLOAD = 23  # a client's upload, e.g. CReFF's class batches (seed, round, client)
TAG_CREFF_HEAD_INIT = 24  # the classifier CReFF's first class gradients are taken at (seed)
TAG_CLIP2FL_TEXT_PROJECTION = 25  # CLIP2FL's map of the text embeddings to the feature width (seed)
PLUGIN_TAGS = 1000  # strategies from outside the package: 1000 and up
# -- data sources and partitions (their own numbering, kept as it was) -----------------------------------------
TAG_DIRICHLET = 101
TAG_CREFF_SHUFFLE = 102  # the creff partition's shuffle
TAG_CREFF_SPLIT = 103  # ... and its split
TAG_IID = 105
TAG_SHARDS = 106
TAG_TRAIN_FRACTION = 107  # which images of each class data.train_fraction keeps (seed)
TAG_SYNTHETIC_PROTOTYPES = 201
TAG_SYNTHETIC_TRAIN = 202
TAG_SYNTHETIC_TEST = 203
TAG_SYNTHETIC_CLIENT = 204


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys such as (seed, tag, round, client id)."""
    words = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1]))


def generator(*keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``derive_seed(*keys)``."""
    return torch.Generator().manual_seed(derive_seed(*keys))


def _check_distinct() -> None:
    tags = {name: value for name, value in globals().items() if name.startswith("TAG_")}
    assert len(set(tags.values())) == len(tags), f"two streams share a tag: {tags}"


_check_distinct()
