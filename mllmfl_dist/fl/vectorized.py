"""Several clients trained at once as one batched model (``federated.vectorize = K``).

Cross-device rounds train many clients of a handful of samples each at small batch sizes, where a step's
fixed cost (Python, kernel launches) outweighs its arithmetic. Here a host trains a group of up to K clients
as one model whose parameters, buffers and SGD momentum are stacked along a leading client axis: one step
runs ``torch.func.vmap`` over ``torch.func.functional_call`` of the model, so K tiny steps become one step
of K times the work. What no mainstream PyTorch FL simulator does; FedJAX and DrJAX do it in JAX.

It equals training the group's clients one after another (:func:`mllmfl_dist.fl.client.train_client`) to
float tolerance:

- each client's batches come from its own (seed, round, client) generator, drawn in the order
  :func:`train_client` draws them (:func:`client_batches`), so data order and augmentation are the same;
- the group is sorted by step count, longest first, so the clients still training at a step are a prefix of
  the stack: a finished client is left out of every later step, its weights, statistics and momentum frozen
  (FedJAX masks them the same way);
- a batch shorter than the group's (an epoch's ragged last batch) is padded, and its padding is stacked out of
  the loss and out of BatchNorm's batch statistics and running statistics (:class:`StackedBatchNorm`);
- SGD with momentum and weight decay is ``torch.optim.SGD``'s update, written on the stacked tensors.

What differs is rounding: a batched convolution sums in another order, so parameters agree with the
sequential result to about 1e-5 relative after a round (tests/test_vectorized.py states and checks the bound).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from mllmfl_dist.core.seeds import TAG_CLIENT_TRAINING, generator
from mllmfl_dist.data import ClientData, augment_batch, normalize
from mllmfl_dist.fl.client import LocalTraining

Tensors = dict[str, torch.Tensor]
Penalty = Callable[[Tensors, Tensors], torch.Tensor | None]


@dataclass(frozen=True)
class ClientBatches:
    """One client's local training as data: its batches in the order :func:`train_client` takes them."""

    images: list[torch.Tensor]  # per step: normalized float32 [b, C, H, W], 2 <= b <= batch_size
    labels: list[torch.Tensor]  # per step: int64 [b]

    @property
    def steps(self) -> int:
        return len(self.images)


def client_batches(
    images: torch.Tensor, labels: torch.Tensor, spec: LocalTraining, generator: torch.Generator
) -> ClientBatches:
    """The batches :func:`mllmfl_dist.fl.client.train_client` would train one client on (uint8 ``images``
    [n, C, H, W], ``labels`` [n]), drawing from ``generator`` in the same order: a permutation per epoch,
    then each batch's augmentation; batches of one sample are skipped, as there."""
    out_images, out_labels = [], []
    n = labels.shape[0]
    for _ in range(spec.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, spec.batch_size):
            batch = order[start : start + spec.batch_size]
            if batch.numel() < 2:
                continue
            x = augment_batch(images[batch], generator, spec.crop_padding, spec.hflip, spec.random_crop)
            out_images.append(normalize(x, spec.mean, spec.std))
            out_labels.append(labels[batch])
    return ClientBatches(out_images, out_labels)


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
            batches, counts = [], []
            for cid in group:
                images, labels = data.client(cid)
                stream = generator(seed, TAG_CLIENT_TRAINING, round_index, cid)
                batches.append(client_batches(images.to(device), labels.to(device), self.spec, stream))
                counts.append(labels.shape[0])
            states, losses = self.train(start, batches, device)
            yield from zip(group, counts, states, losses)

    def train(
        self, start: Tensors, clients: Sequence[ClientBatches], device: torch.device | str = "cpu"
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
        loss_sum = torch.zeros(k, dtype=torch.float64, device=device)
        seen = [0] * k
        for step in range(max((c.steps for c in clients), default=0)):
            # The clients still training, by the size of their batch at this step: one stacked step per size,
            # so no batch is padded and BatchNorm's statistics see only real samples.
            by_size: dict[int, list[int]] = {}
            for i, client in enumerate(clients):
                if client.steps > step:
                    by_size.setdefault(client.labels[step].shape[0], []).append(i)
            for size, rows in sorted(by_size.items()):
                index = torch.tensor(rows, device=device)
                losses = self._step(stacked, momentum, global_params, [clients[i] for i in rows], step, index)
                loss_sum.index_add_(0, index, losses.double() * size)
                for i in rows:
                    seen[i] += size
        steps = torch.tensor([c.steps for c in clients], device=device)
        for key in self.tracked_keys:
            stacked[key] += steps.to(stacked[key].dtype)
        states = [{name: stacked[name][i] for name in start} for i in range(k)]
        return states, [float(loss_sum[i]) / seen[i] if seen[i] else float("nan") for i in range(k)]

    def _step(
        self,
        stacked: Tensors,
        momentum: Tensors,
        global_params: Tensors,
        clients: Sequence[ClientBatches],
        step: int,
        index: torch.Tensor,
    ) -> torch.Tensor:
        """One SGD step of the clients at rows ``index`` of the stack, on their batches of ``step`` (all of one
        size); returns their losses [g]."""
        device = index.device
        g = len(clients)
        x = torch.stack([c.images[step] for c in clients]).to(device)  # [g, B, C, H, W]
        y = torch.stack([c.labels[step] for c in clients]).to(device)  # [g, B]
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
        grads = torch.autograd.grad(losses.sum(), list(params.values()))
        with torch.no_grad():
            self._sgd(params, dict(zip(params, grads)), momentum, index, step == 0)
            for name, value in (*params.items(), *((n, rest[n]) for n in self.running_names)):
                stacked[name].index_copy_(0, index, value)
        return losses.detach()

    def _sgd(self, params: Tensors, grads: Tensors, momentum: Tensors, index: torch.Tensor, first: bool) -> None:
        """``torch.optim.SGD``'s step (no dampening, not Nesterov) on the rows ``index`` of the stack, in place on
        ``params`` (those rows); ``momentum`` holds every client's buffer."""
        spec = self.spec
        for name, p in params.items():
            d_p = grads[name]
            p = p.detach()
            if spec.weight_decay:
                d_p = d_p.add(p, alpha=spec.weight_decay)
            if spec.momentum:
                buf = d_p.clone() if first else momentum[name].index_select(0, index).mul_(spec.momentum).add_(d_p)
                momentum[name].index_copy_(0, index, buf)
                d_p = buf
            p.add_(d_p, alpha=-spec.lr)
