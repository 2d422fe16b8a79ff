"""Aggregation maths on flat buffers: pure functions, tested against numpy.

A model's whole state (parameters and buffers, BatchNorm running statistics included) is laid out as
one flat float64 vector. A client host accumulates ``n_k * state_k`` of its clients into a buffer whose
last element is the total weight ``sum n_k``; summing those buffers over ranks (one all_reduce) and
dividing gives the sample-weighted mean, whatever the number of hosts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


class FlatLayout:
    """Fixed order, shapes and dtypes of a state dict, to move it to and from one flat vector."""

    def __init__(self, state: Mapping[str, torch.Tensor], trainable: Sequence[str] = ()):
        self.keys = tuple(state)
        self.shapes = tuple(state[k].shape for k in self.keys)
        self.dtypes = tuple(state[k].dtype for k in self.keys)
        sizes = [state[k].numel() for k in self.keys]
        self.offsets = tuple(sum(sizes[:i]) for i in range(len(sizes) + 1))
        self.numel = self.offsets[-1]
        # Mask over the flat vector: True where an entry belongs to a trainable parameter. The server
        # optimizer steps those; buffers (BatchNorm statistics) take the plain weighted mean.
        mask = torch.zeros(self.numel, dtype=torch.bool)
        trainable_set = set(trainable)
        for i, key in enumerate(self.keys):
            if key in trainable_set:
                mask[self.offsets[i] : self.offsets[i + 1]] = True
        self.trainable_mask = mask

    @classmethod
    def of_module(cls, module: torch.nn.Module) -> FlatLayout:
        trainable = [name for name, p in module.named_parameters() if p.requires_grad]
        return cls(module.state_dict(), trainable)

    @classmethod
    def of_shapes(cls, shapes: Mapping[str, Sequence[int]], dtype: torch.dtype = torch.float64) -> FlatLayout:
        """The layout of named tensors of these shapes (a strategy's uploads, the round's buffer)."""
        return cls({name: torch.empty(tuple(shape), dtype=dtype, device="meta") for name, shape in shapes.items()})

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each entry of ``flat`` as a view of its shape: writing into a view writes into ``flat``."""
        return {
            key: flat[self.offsets[i] : self.offsets[i + 1]].view(self.shapes[i]) for i, key in enumerate(self.keys)
        }

    def flatten(
        self, state: Mapping[str, torch.Tensor], out: torch.Tensor | None = None, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        if out is None:
            device = state[self.keys[0]].device
            out = torch.empty(self.numel, dtype=dtype, device=device)
        for i, key in enumerate(self.keys):
            out[self.offsets[i] : self.offsets[i + 1]].copy_(state[key].reshape(-1))
        return out

    def unflatten_into(self, flat: torch.Tensor, state: Mapping[str, torch.Tensor]) -> None:
        """Copy ``flat`` into the tensors of ``state`` in place (e.g. a module's state_dict)."""
        for i, key in enumerate(self.keys):
            piece = flat[self.offsets[i] : self.offsets[i + 1]].view(self.shapes[i])
            target = state[key]
            if target.dtype.is_floating_point:
                target.copy_(piece)
            else:  # integer buffers (num_batches_tracked) come back from a weighted mean as floats
                target.copy_(piece.round())

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        state = {k: torch.empty(s, dtype=d, device=flat.device) for k, s, d in zip(self.keys, self.shapes, self.dtypes)}
        self.unflatten_into(flat, state)
        return state


def new_accumulator(numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Zeros for ``numel`` weighted-sum entries plus one slot for the total weight (float64)."""
    return torch.zeros(numel + 1, dtype=torch.float64, device=device)


def accumulate_(acc: torch.Tensor, flat: torch.Tensor, weight: float) -> torch.Tensor:
    """``acc[:-1] += weight * flat``; ``acc[-1] += weight``."""
    acc[:-1].add_(flat.to(torch.float64), alpha=float(weight))
    acc[-1] += float(weight)
    return acc


def mean_from_sum(acc: torch.Tensor) -> torch.Tensor:
    total = float(acc[-1])
    if total <= 0:
        raise RuntimeError("no client contributed any samples this round (total weight is 0)")
    return acc[:-1] / total


def weighted_mean(flats: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Sample-weighted mean of flat vectors, through the same accumulator the round loop uses."""
    acc = new_accumulator(flats[0].numel(), flats[0].device)
    for flat, weight in zip(flats, weights):
        accumulate_(acc, flat, weight)
    return mean_from_sum(acc)


def add_named_(parts: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Add each named tensor into the view of the same name (float64, reshaped to it); a name with no view is
    a strategy's mistake, raised as KeyError naming the views there are."""
    for name, tensor in tensors.items():
        if name not in parts:
            raise KeyError(
                f"an upload named {name!r} is not among the strategy's upload_shapes ({', '.join(parts) or 'none'})"
            )
        parts[name] += tensor.reshape(parts[name].shape).to(parts[name].device, torch.float64)
