"""The size of a round's buffers, and its limit: a strategy's uploads and per-client state slots ride in the
round's one all_reduce and one broadcast (:mod:`mllmfl_dist.fl.trainer`), so a layout too large for them is
refused before any round runs (and ``check`` estimates the same bytes)."""

from __future__ import annotations

from mllmfl_dist.config import ConfigError
from mllmfl_dist.fl.aggregation import FlatLayout

# A strategy's uploads and per-client state slots above this (per round, per rank) are refused: CReFF's class
# gradients grow as classes^2 x feature width (ImageNet-LT with ResNet-50: 1000 x 1000 x 2049 entries, 16 GB),
# SCAFFOLD's slots as clients per round x parameters.
MAX_UPLOAD_BYTES = 2 * 2**30


def client_state_slot_bytes(width: int, clients_per_round: int) -> tuple[int, int]:
    """Bytes the per-client state slots add to a round's (all_reduce, broadcast) buffers, for a state of
    ``width`` entries: K slots of float64 and K presence flags in the all_reduce, K slots of float32 and K flags
    in the broadcast (see :class:`FederatedTrainer`); nothing when the strategy keeps no client state."""
    if not width:
        return 0, 0
    return clients_per_round * (width + 1) * 8, clients_per_round * (width + 1) * 4


def check_upload_size(strategy: str, layout: FlatLayout, state_width: int = 0, clients_per_round: int = 0) -> None:
    """Refuse uploads (``layout``, float64 per rank) and per-client state slots (``state_width`` entries for each
    of ``clients_per_round`` clients, in the all_reduce and the broadcast) that would not fit a round's buffers,
    naming the tensors and their shapes."""
    state_reduce, state_broadcast = client_state_slot_bytes(state_width, clients_per_round)
    size = layout.numel * 8 + state_reduce + state_broadcast
    if size > MAX_UPLOAD_BYTES:
        tensors = [f"{name} {' x '.join(map(str, shape))} float64" for name, shape in zip(layout.keys, layout.shapes)]
        if state_width:
            tensors.append(
                f"client state {clients_per_round} x {state_width} float64 in the all_reduce and "
                f"float32 in the broadcast"
            )
        raise ConfigError(
            f"federated.strategy = {strategy!r} would add {size / 2**30:.1f} GiB per round to the all_reduce and "
            f"broadcast ({', '.join(tensors)}); the limit is {MAX_UPLOAD_BYTES / 2**30:.0f} GiB. Use a task with "
            f"fewer classes, a smaller model (model.width_scale, model.arch) or fewer federated.clients_per_round"
        )
