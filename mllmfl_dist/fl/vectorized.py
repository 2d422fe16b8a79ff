"""Several clients trained at once as one stacked model (``federated.vectorize = K``).

Cross-device rounds train many clients of a handful of samples each at small batch sizes, where a step's fixed
cost (Python, the optimizer, kernel launches) weighs against its arithmetic. Here a host trains a group of up to
K clients as one model whose parameters, BatchNorm statistics and SGD momentum are stacked along a leading
client axis (:func:`stacked_model`): the clients' channels side by side, each convolution one grouped
convolution, each BatchNorm one BatchNorm over clients x channels, each linear layer one batched product; one
backward of the summed losses gives every client its own gradients. FedJAX and DrJAX do the like in JAX.

It equals training the group's clients one after another (:func:`mllmfl_dist.fl.client.train_client`) to
float tolerance:

- each client's batches come from its own (seed, round, client) generator, drawn in the order
  :func:`train_client` draws them (:class:`ClientStream`), so data order and augmentation are the same;
- a step stacks the clients still training whose batch at that step has the same size (one stacked step per
  size), so a finished client is left out (its weights, statistics and momentum frozen) and an epoch's ragged
  last batch is never padded: BatchNorm's statistics see only real samples;
- SGD with momentum and weight decay is ``torch.optim.SGD``'s update, written on the stacked tensors (a
  parameter without a gradient is skipped, as there).

What differs is rounding: a grouped convolution sums in another order. tests/test_vectorized.py states the
tolerance and checks it; docs/explanation/performance.md says when stacking is faster.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call

from mllmfl_dist.core.seeds import TAG_CLIENT_TRAINING, generator
from mllmfl_dist.data import ClientData, apply_augmentation, normalize
from mllmfl_dist.data.local_batches import draw_local_batches, to_device
from mllmfl_dist.fl.client import LocalTraining

Tensors = dict[str, torch.Tensor]
Penalty = Callable[[Tensors, Tensors], torch.Tensor | None]


class ClientStream:
    """One client's local training data, batch by batch in the order :func:`mllmfl_dist.fl.client.train_client`
    takes it: every step's rows and augmentation drawn from ``generator`` before the first
    (:func:`mllmfl_dist.data.local_batches.draw_local_batches`, batches of one sample skipped, as there) and
    moved to the images' device in one copy; each step's images are gathered and augmented when it is taken, so
    a group holds one batch per client at a time.

    ``images``: uint8 [n, C, H, W]; ``labels``: int64 [n]. ``sizes``: the batch size of each step;
    :meth:`next_batch` returns normalized float32 [b, C, H, W] and labels [b] of the next step.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, spec: LocalTraining, generator: torch.Generator):
        self.images, self.labels, self.spec = images, labels, spec
        drawn = draw_local_batches(
            labels.shape[0], spec.batch_size, spec.epochs, generator, spec.crop_padding, spec.hflip, spec.random_crop
        )
        self.sizes = [step.rows.numel() for step in drawn]
        self._pending = to_device(drawn, images.device)

    @property
    def steps(self) -> int:
        return len(self.sizes)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        step = self._pending.pop(0)
        x = apply_augmentation(self.images[step.rows], step.offsets, step.flips, self.spec.crop_padding)
        return normalize(x, self.spec.mean, self.spec.std), self.labels[step.rows]


class _StackedConv2d(nn.Module):
    """A convolution of ``g`` clients at once: input [B, g*C, H, W], weight [g, O, C/groups, kh, kw] (set per
    call by ``functional_call``), one grouped convolution with ``g * groups`` groups."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros":
            raise ValueError("vectorized clients need convolutions with numeric zero padding")
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.weight.shape[0]
        weight = self.weight.reshape(-1, *self.weight.shape[2:])
        bias = self.bias.reshape(-1) if self.bias is not None else None
        return nn.functional.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups * g)


class _StackedBatchNorm(nn.Module):
    """BatchNorm of ``g`` clients at once: input [B, g*C, ...], one BatchNorm over g*C channels whose running
    statistics are the clients' stacked ones (updated in place, as ``nn.BatchNorm`` does; the trainer counts
    ``num_batches_tracked`` itself)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        if bn.momentum is None or not bn.track_running_stats or not bn.affine:
            raise ValueError("vectorized clients need BatchNorm with affine weights, running stats and a momentum")
        self.eps, self.momentum = bn.eps, bn.momentum
        self.weight, self.bias = bn.weight, bn.bias
        self.running_mean: torch.Tensor
        self.running_var: torch.Tensor
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(
            x,
            self.running_mean.view(-1),
            self.running_var.view(-1),
            self.weight.reshape(-1),
            self.bias.reshape(-1),
            True,
            self.momentum,
            self.eps,
        )


class _StackedLinear(nn.Module):
    """A linear layer of ``g`` clients at once: input [B, g*I], weight [g, O, I], bias [g, O]; output [B, g*O]."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, out_features, in_features = self.weight.shape
        x = x.reshape(x.shape[0], g, in_features).transpose(0, 1)  # [g, B, I]
        if self.bias is None:
            y = torch.bmm(x, self.weight.transpose(1, 2))
        else:
            y = torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))
        return y.transpose(0, 1).reshape(x.shape[1], g * out_features)


_STACKED = {nn.Conv2d: _StackedConv2d, nn.BatchNorm1d: _StackedBatchNorm, nn.BatchNorm2d: _StackedBatchNorm}


def stacked_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that runs several clients at once (same state-dict keys; each parameter and buffer
    gets a leading client axis when passed to ``functional_call``), with its inputs' channels stacked client-major
    ([B, g*C, H, W]). Raises ValueError naming a layer with weights it cannot stack."""
    model = copy.deepcopy(model)
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            kind = nn.Linear if isinstance(child, nn.Linear) else type(child)
            if kind is nn.Linear:
                setattr(parent, name, _StackedLinear(child))
            elif kind in _STACKED:
                setattr(parent, name, _STACKED[kind](child))
            elif any(True for _ in child.parameters(recurse=False)) or any(True for _ in child.buffers(recurse=False)):
                where = f"{parent_name}.{name}".lstrip(".")
                raise ValueError(
                    f"vectorized clients cannot stack layer {where} ({type(child).__name__}); they support "
                    f"Conv2d, BatchNorm and Linear layers with weights"
                )
    return model


class VectorizedClients:
    """Trains groups of clients as one stacked model (:func:`stacked_model`); built once per run on each host.

    ``model``: the FL model (its weights are not used: every group starts from the ``start`` state passed to
    :meth:`train`); ``penalty``: the strategy's term added to each client's cross-entropy, from the trainable
    parameters stacked [g, ...] and the round's global ones, returning [g] (FedProx's proximal term,
    :meth:`mllmfl_dist.fl.strategies.Strategy.local_penalty`; None: plain cross-entropy).
    """

    def __init__(self, model: nn.Module, spec: LocalTraining, penalty: Penalty | None = None):
        self.spec, self.penalty = spec, penalty
        self.model = stacked_model(model).train()
        self.param_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.frozen_names = [n for n, p in self.model.named_parameters() if not p.requires_grad]
        self.buffer_names = [n for n, _ in self.model.named_buffers()]
        self.tracked_keys = [n for n in self.buffer_names if n.endswith("num_batches_tracked")]
        # Running statistics, which the stacked BatchNorm updates in place (num_batches_tracked is counted here).
        self.running_names = [n for n in self.buffer_names if n not in self.tracked_keys]

    def train_groups(
        self, groups: Sequence[Sequence[int]], data: ClientData, seed: int, round_index: int, start: Tensors
    ) -> Iterator[tuple[int, int, Tensors, float]]:
        """A host's share of a round: each group of client ids trained at once from the state dict ``start``,
        each client's data order and augmentation from its own (seed, round, client) stream. Yields, client by
        client, (client id, its sample count, its trained state dict, its loss)."""
        device = next(iter(start.values())).device
        start = {k: v.detach().clone() for k, v in start.items()}
        for group in groups:
            streams, counts = [], []
            for cid in group:
                images, labels = data.client(cid)
                draws = generator(seed, TAG_CLIENT_TRAINING, round_index, cid)
                streams.append(ClientStream(images.to(device), labels.to(device), self.spec, draws))
                counts.append(labels.shape[0])
            states, losses = self.train(start, streams, device)
            yield from zip(group, counts, states, losses)

    def train(
        self, start: Tensors, clients: Sequence[ClientStream], device: torch.device | str = "cpu"
    ) -> tuple[list[Tensors], list[float]]:
        """Train ``clients`` from the state dict ``start``; returns each client's final state dict (views into
        the stack, in the order given) and its training loss averaged over its samples (NaN for a client that
        takes no step, as :func:`train_client`)."""
        k = len(clients)
        stacked = {name: t.to(device).unsqueeze(0).repeat(k, *([1] * t.ndim)) for name, t in start.items()}
        params = {n: stacked[n] for n in self.param_names}
        global_params = {n: start[n].to(device) for n in self.param_names}
        # Every client's momentum buffer; torch.optim.SGD starts it at the first step's d_p, and every client
        # that trains at all takes its first step at step 0.
        momentum = {n: torch.zeros_like(t) for n, t in params.items()} if self.spec.momentum else {}
        # The schedule, known before any step: at each step, the clients still training by the size of their
        # batch there, one stacked step per size. Its row indices go to the device in one copy, so no step waits
        # for the host.
        schedule: list[tuple[int, int, list[int]]] = []
        for step in range(max((c.steps for c in clients), default=0)):
            by_size: dict[int, list[int]] = {}
            for i, client in enumerate(clients):
                if client.steps > step:
                    by_size.setdefault(client.sizes[step], []).append(i)
            schedule += [(step, size, rows) for size, rows in sorted(by_size.items())]
        flat_rows = torch.tensor([i for _, _, rows in schedule for i in rows], dtype=torch.int64).to(device)
        loss_sum = torch.zeros(k, dtype=torch.float64, device=device)
        offset = 0
        for step, size, rows in schedule:
            index = flat_rows[offset : offset + len(rows)]
            offset += len(rows)
            losses = self._step(stacked, momentum, global_params, [clients[i] for i in rows], step == 0, index)
            loss_sum.index_add_(0, index, losses.double() * size)
        steps = torch.tensor([c.steps for c in clients]).to(device)
        for key in self.tracked_keys:
            stacked[key] += steps.to(stacked[key].dtype)
        states = [{name: stacked[name][i] for name in start} for i in range(k)]
        seen = [sum(c.sizes) for c in clients]
        return states, [s / n if n else float("nan") for s, n in zip(loss_sum.tolist(), seen)]

    def _step(
        self,
        stacked: Tensors,
        momentum: Tensors,
        global_params: Tensors,
        clients: Sequence[ClientStream],
        first: bool,
        index: torch.Tensor,
    ) -> torch.Tensor:
        """One SGD step of the clients at rows ``index`` of the stack, on their next batches (all of one size;
        ``first``: the clients' first step); returns their losses [g]."""
        g = len(clients)
        batches = [c.next_batch() for c in clients]
        x = torch.stack([b[0] for b in batches])  # [g, B, C, H, W]
        y = torch.stack([b[1] for b in batches])  # [g, B]
        batch = x.shape[1]
        x = x.transpose(0, 1).reshape(batch, g * x.shape[2], *x.shape[3:])  # channels client-major
        params = {n: stacked[n].index_select(0, index).requires_grad_() for n in self.param_names}
        rest = {n: stacked[n].index_select(0, index) for n in (*self.frozen_names, *self.running_names)}
        logits = functional_call(self.model, {**params, **rest}, (x,)).reshape(batch, g, -1)
        per_sample = nn.functional.cross_entropy(logits.reshape(batch * g, -1), y.t().reshape(-1), reduction="none")
        losses = per_sample.reshape(batch, g).mean(0)
        penalty = self.penalty(params, global_params) if self.penalty is not None else None
        if penalty is not None:
            losses = losses + penalty
        grads = torch.autograd.grad(losses.sum(), list(params.values()), allow_unused=True)
        with torch.no_grad():
            self._sgd(params, dict(zip(params, grads)), momentum, index, first)
            for name, value in (*params.items(), *((n, rest[n]) for n in self.running_names)):
                stacked[name].index_copy_(0, index, value)
        return losses.detach()

    def _sgd(
        self,
        params: Tensors,
        grads: dict[str, torch.Tensor | None],
        momentum: Tensors,
        index: torch.Tensor,
        first: bool,
    ) -> None:
        """``torch.optim.SGD``'s step (no dampening, not Nesterov) on the rows ``index`` of the stack, in place on
        ``params`` (those rows); ``momentum`` holds every client's buffer. A parameter the loss does not reach has
        no gradient and is left alone, as SGD leaves a parameter whose ``grad`` is None."""
        spec = self.spec
        for name, p in params.items():
            d_p = grads[name]
            if d_p is None:
                continue
            p = p.detach()
            if spec.weight_decay:
                d_p = d_p.add(p, alpha=spec.weight_decay)
            if spec.momentum:
                buf = d_p.clone() if first else momentum[name].index_select(0, index).mul_(spec.momentum).add_(d_p)
                momentum[name].index_copy_(0, index, buf)
                d_p = buf
            p.add_(d_p, alpha=-spec.lr)
