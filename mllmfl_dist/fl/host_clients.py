"""What a client host does with its clients in a round (:meth:`FederatedTrainer.run_round`): train them one
after another, or in stacked groups (``federated.vectorize``, fl/vectorized.py). Each yields, client by client,
(slot, :class:`ClientContext`, trained flat state float64, loss); the round loop does the rest.

A client that takes no local step (one sample: :func:`~mllmfl_dist.fl.client.local_steps` is 0) ends with the
round's start model: it is yielded as ``start`` itself, without a reset, a copy or a check of the model, unless the
strategy's client hooks read the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from mllmfl_dist.core.seeds import TAG_CLIENT_TRAINING, TAG_CLIENT_UPLOAD, generator
from mllmfl_dist.fl.aggregation import add_named_
from mllmfl_dist.fl.client import local_optimizer, local_steps, train_client
from mllmfl_dist.fl.strategies import ClientContext, Strategy

if TYPE_CHECKING:
    from mllmfl_dist.fl.trainer import FederatedTrainer

Trained = Iterator[tuple[int, ClientContext, torch.Tensor, float]]

# The client hooks that read or change the model; a strategy overriding none of them needs no model for a client
# that takes no step.
_MODEL_HOOKS = ("client_upload", "start_client", "finish_client", "local_loss_inputs")


def _reads_model(strategy: Strategy) -> bool:
    return any(getattr(type(strategy), h) is not getattr(Strategy, h) for h in _MODEL_HOOKS)


def one_by_one(
    trainer: FederatedTrainer,
    mine: Sequence[int],
    clients: Sequence[int],
    round_index: int,
    start: torch.Tensor,
    upload_parts: dict[str, torch.Tensor],
) -> Trained:
    """Train this host's clients one after another from ``start``; yields (slot, context, trained flat
    state, loss) while the model still holds the client's model (finish_client may read it)."""
    seed, device = trainer.seed, trainer.runtime.device
    global_params: list[torch.Tensor] = []
    if mine and trainer.strategy.reads_global_params:
        global_params = [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]
    # Per client, only what training needs: the model is reset from a copy of the round's start in its own
    # dtypes and read back in one foreach copy each (no state_dict rebuilt per client), and the SGD optimizer
    # is built once per round and reset (its momentum cleared), which is what a new one would hold.
    state = trainer.model.state_dict()
    tensors = [state[key] for key in trainer.layout.keys]
    trainer.set_global_flat(start)
    start_tensors = [t.detach().clone() for t in tensors]
    optimizer = local_optimizer(trainer.model, trainer.local)
    reads_model, modified = _reads_model(trainer.strategy), False
    for cid in mine:
        slot = clients.index(cid)
        n = trainer.data.client_size(cid)
        if not reads_model and local_steps(n, trainer.local) == 0:
            yield slot, trainer.client_context(round_index, slot, cid, n), start, float("nan")
            continue
        if modified:
            torch._foreach_copy_(tensors, start_tensors)
        modified = True
        images, labels = trainer.data.client(cid)
        client = trainer.client_context(round_index, slot, cid, labels.shape[0])
        if trainer.upload_layout.numel:
            upload_generator = generator(seed, TAG_CLIENT_UPLOAD, round_index, cid)
            add_named_(
                upload_parts,
                trainer.strategy.client_upload(trainer.model, images, labels, trainer.local, upload_generator, device),
            )
        trainer.strategy.start_client(trainer.model, client)
        loss = train_client(
            trainer.model,
            images,
            labels,
            trainer.local,
            generator(seed, TAG_CLIENT_TRAINING, round_index, cid),
            trainer.strategy,
            global_params,
            device,
            trainer.strategy.local_loss_inputs(trainer.data, cid),
            optimizer,
        )
        trained = torch.empty(trainer.layout.numel, dtype=torch.float64, device=device)
        torch._foreach_copy_(list(trainer.layout.views(trained).values()), tensors)
        yield slot, client, trained, loss


def stacked(
    trainer: FederatedTrainer,
    groups: Sequence[Sequence[int]],
    clients: Sequence[int],
    round_index: int,
    start: torch.Tensor,
) -> Trained:
    """Train this host's groups of clients each as one stacked model (fl/vectorized.py), from ``start``;
    yields what :func:`one_by_one` does (strategies that vectorize read no model in finish_client)."""
    assert trainer.vectorized is not None  # the caller's choice
    trainer.set_global_flat(start)
    trained = trainer.vectorized.train_groups(
        groups, trainer.data, trainer.seed, round_index, trainer.model.state_dict()
    )
    for cid, num_samples, state, loss in trained:
        slot = clients.index(cid)
        flat = start if local_steps(num_samples, trainer.local) == 0 else trainer.layout.flatten(state)
        yield slot, trainer.client_context(round_index, slot, cid, num_samples), flat, loss
