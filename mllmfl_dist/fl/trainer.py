"""The round loop, written once for every strategy.

Each round: sample K of N clients from (seed, round); assign them to client hosts (LPT by size); every
host trains its clients one after another from the same global model and accumulates ``n_k * state_k``
into one float64 buffer with the total weight appended, followed by the strategy's payload (CReFF's
per-class classifier gradients); one all_reduce; the server steps the strategy and hands it the summed
payload; one broadcast of the new global model as a flat buffer, followed by the strategy's shared state
(CReFF's re-trained classifier), after rank 0's ``server_hook`` (e.g. alignment).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mllmfl_dist.core import dist
from mllmfl_dist.config import Config
from mllmfl_dist.data import ClientData
from mllmfl_dist.core.errors import TrainingDivergedError
from mllmfl_dist.fl.aggregation import FlatLayout, accumulate_, mean_from_sum, new_accumulator
from mllmfl_dist.fl.client import LocalTraining, train_client
from mllmfl_dist.fl.sampling import TAG_CLIENT_TRAINING, assign_clients, derive_seed, sample_clients
from mllmfl_dist.fl.strategies import Strategy
from mllmfl_dist.models import FLModel

TAG_CLIENT_PAYLOAD = 23  # derive_seed stream of a client's payload (CReFF's class batches), per round

# Where a round went non-finite; the broadcast carries the index, so every rank stops with one message.
DIVERGED_NOWHERE = "nowhere"
DIVERGED_IN_SERVER_STEP = "server_step"
DIVERGED_IN_SERVER_UPDATE = "server_update"
DIVERGED_IN_SERVER_HOOK = "server_hook"
DIVERGENCE_CODES = (DIVERGED_NOWHERE, DIVERGED_IN_SERVER_STEP, DIVERGED_IN_SERVER_UPDATE, DIVERGED_IN_SERVER_HOOK)


def divergence_message(cfg: Config, round_index: int, where: str, clients: Sequence[int] = ()) -> str:
    """One line: the round, where it went non-finite (which clients), and the settings to look at."""
    fed = cfg.federated
    if where == "clients":
        what = f"the local training of client(s) {', '.join(map(str, clients))} went non-finite (NaN or inf weights)"
        keys = [f"federated.lr = {fed.lr:g}", f"federated.momentum = {fed.momentum:g}",
                f"federated.weight_decay = {fed.weight_decay:g}", f"federated.batch_size = {fed.batch_size}"]
        keys += {"fedprox": [f"federated.prox_mu = {fed.prox_mu:g}"],
                 "clip2fl": [f"clip2fl.alpha = {cfg.clip2fl.alpha:g}"]}.get(fed.strategy, [])
    elif where == DIVERGED_IN_SERVER_STEP:
        what = "the server step made the global model non-finite"
        keys = [f"federated.server_lr = {fed.server_lr:g}", f"federated.server_momentum = {fed.server_momentum:g}"]
    elif where == DIVERGED_IN_SERVER_UPDATE:
        what = f"{fed.strategy}'s server update (federated features, re-trained classifier) went non-finite"
        keys = [f"creff.lr_feature = {cfg.creff.lr_feature:g}", f"creff.lr_crt = {cfg.creff.lr_crt:g}"]
    else:
        what = "global alignment made the model non-finite"
        keys = [f"align.lr = {cfg.align.lr:g}", f"align.beta = {cfg.align.beta:g}", f"align.steps = {cfg.align.steps}"]
    return (f"round {round_index}: {what}; nothing of this round was saved and the last checkpoint is kept. "
            f"Look at {', '.join(keys)}")


def _finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


@dataclass(frozen=True)
class RoundStats:
    round: int
    seconds: float
    clients: tuple[int, ...]  # the round's sampled clients
    local_clients: tuple[int, ...]  # those this rank trained
    bytes_all_reduced: int
    bytes_broadcast: int
    server: dict[str, float]  # the strategy's numbers of the round (rank 0), e.g. CReFF's match_loss
    stop_requested: bool = False  # some rank was asked to stop (preempt.py): every rank stops after this round
    train_loss: float = float("nan")  # the clients' mean training loss, weighted by their sample counts


class FederatedTrainer:
    def __init__(self, cfg: Config, runtime: dist.Runtime, data: ClientData, model: FLModel,
                 strategy: Strategy, server_hook: Callable[[FLModel, int], None] | None = None):
        self.cfg = cfg
        self.runtime = runtime
        self.data = data
        self.model = model.to(runtime.device)
        self.strategy = strategy
        self.layout = FlatLayout.of_module(self.model)
        self.trainable_mask = self.layout.trainable_mask.to(runtime.device)
        self.local = LocalTraining.from_config(cfg, data.mean, data.std)
        self.payload_numel = strategy.payload_numel(self.model)
        self.shared_numel = strategy.shared_numel(self.model)
        # Rank 0 only, after the server step and before the broadcast (global alignment plugs in here).
        self.server_hook = server_hook
        self.rounds_done = 0
        # Rounds are timed from the end of the previous one, so that rank 0's evaluation and checkpoint
        # writing, which overlap the next round's client training, count when they hold a round up.
        self._last_round_end: float | None = None

    # -- global model ----------------------------------------------------------------------------
    def global_flat(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return self.layout.flatten(self.model.state_dict(), dtype=dtype)

    def set_global_flat(self, flat: torch.Tensor) -> None:
        self.layout.unflatten_into(flat, self.model.state_dict())

    def broadcast_global(self) -> int:
        """Make every rank hold rank 0's global model (and the strategy's shared state, after it in the same
        buffer); returns the bytes broadcast."""
        sent, status = self._broadcast(DIVERGED_NOWHERE, "rank 0's broadcast of the model to start from")
        if status != DIVERGED_NOWHERE:
            raise TrainingDivergedError(
                f"the global model to start round {self.rounds_done + 1} from is non-finite (a checkpoint or "
                f"backbone written by a run that diverged?); start over with another run.name")
        return sent

    def _broadcast(self, status: str, what: str) -> tuple[int, str]:
        """The broadcast, carrying rank 0's divergence ``status`` in its last entry; returns the bytes
        broadcast and the status every rank received (a non-finite buffer counts as diverged too)."""
        end = self.layout.numel + self.shared_numel
        flat = torch.empty(end + 1, dtype=torch.float32, device=self.runtime.device)
        self.layout.flatten(self.model.state_dict(), out=flat[: self.layout.numel])
        if self.shared_numel:
            flat[self.layout.numel : end] = self.strategy.shared_state()
        flat[end] = DIVERGENCE_CODES.index(status)
        dist.broadcast_from_server_(self.runtime, flat, what)
        status = DIVERGENCE_CODES[int(flat[end])]
        if status == DIVERGED_NOWHERE and not bool(torch.isfinite(flat).all()):
            status = DIVERGED_IN_SERVER_STEP
        if status == DIVERGED_NOWHERE:
            self.set_global_flat(flat[: self.layout.numel])
            if self.shared_numel:
                self.strategy.load_shared_state(flat[self.layout.numel : end])
        return flat.numel() * flat.element_size(), status

    # -- one round -------------------------------------------------------------------------------
    def run_round(self, round_index: int) -> RoundStats:
        started = self._last_round_end or time.perf_counter()
        fed = self.cfg.federated
        seed = self.cfg.run.seed
        clients = sample_clients(seed, round_index, fed.num_clients, fed.clients_per_round)
        plan = assign_clients(clients, [self.data.client_size(c) for c in clients], self.runtime.client_hosts)
        mine = plan.get(self.runtime.rank, [])

        start = self.global_flat(torch.float64)
        # One buffer for the one all_reduce: the model's weighted sum and total weight, then the payload,
        # then one flag per sampled client that went non-finite (so every rank learns which, and stops), then
        # the count of ranks asked to stop (preempt.py), so every rank stops after the same round, then the
        # clients' training losses weighted like the model (sum n_k * loss_k; / total weight = the mean).
        acc = new_accumulator(self.layout.numel + self.payload_numel + len(clients) + 2, self.runtime.device)
        model_acc = acc[: self.layout.numel + 1]
        payload = acc[self.layout.numel + 1 : self.layout.numel + 1 + self.payload_numel]
        diverged = acc[self.layout.numel + 1 + self.payload_numel : -2]
        stop, loss_sum = acc[-2:-1], acc[-1:]
        stop[0] = 1.0 if self.runtime.stop is not None and self.runtime.stop.reason else 0.0
        global_params: list[torch.Tensor] = []
        if mine and self.strategy.needs_global_params:
            global_params = [p.detach().clone() for p in self.model.parameters() if p.requires_grad]
        for cid in mine:
            self.set_global_flat(start)
            images, labels = self.data.client(cid)
            if self.payload_numel:
                payload_generator = torch.Generator().manual_seed(
                    derive_seed(seed, TAG_CLIENT_PAYLOAD, round_index, cid))
                payload += self.strategy.client_payload(self.model, images, labels, self.local, payload_generator,
                                                        self.runtime.device).to(payload.device)
            generator = torch.Generator().manual_seed(derive_seed(seed, TAG_CLIENT_TRAINING, round_index, cid))
            loss = train_client(self.model, images, labels, self.local, generator, self.strategy,
                                global_params, self.runtime.device, self.strategy.client_side_info(self.data, cid))
            state = self.global_flat(torch.float64)
            if bool(torch.isfinite(state).all()):
                accumulate_(model_acc, state, labels.shape[0])
                if math.isfinite(loss):  # a one-sample client takes no step and has no loss
                    loss_sum += labels.shape[0] * loss
            else:  # kept out of the sum; every rank stops after the all_reduce
                diverged[clients.index(cid)] = 1

        dist.all_reduce_sum_(self.runtime, acc, f"round {round_index}'s all_reduce")
        failed = [c for c, flag in zip(clients, diverged.tolist()) if flag]
        if failed:
            raise TrainingDivergedError(divergence_message(self.cfg, round_index, "clients", failed))
        server_record: dict[str, float] = {}
        status = DIVERGED_NOWHERE
        if self.runtime.is_server:
            new = self.strategy.server_step(start, mean_from_sum(model_acc), self.trainable_mask)
            self.set_global_flat(new)
            status = DIVERGED_NOWHERE if _finite(self.model) else DIVERGED_IN_SERVER_STEP
            if self.payload_numel and status == DIVERGED_NOWHERE:
                server_record = self.strategy.server_update(self.model, payload, round_index)
                if self.shared_numel and not bool(torch.isfinite(self.strategy.shared_state()).all()):
                    status = DIVERGED_IN_SERVER_UPDATE
            if self.server_hook is not None and status == DIVERGED_NOWHERE:
                self.server_hook(self.model, round_index)
                status = DIVERGED_NOWHERE if _finite(self.model) else DIVERGED_IN_SERVER_HOOK
        bytes_broadcast, status = self._broadcast(status, f"rank 0's broadcast of round {round_index}'s model")
        if status != DIVERGED_NOWHERE:
            raise TrainingDivergedError(divergence_message(self.cfg, round_index, status))
        self.rounds_done = round_index
        self._last_round_end = time.perf_counter()
        total_weight = float(model_acc[-1])
        return RoundStats(round_index, self._last_round_end - started, tuple(clients), tuple(mine),
                          acc.numel() * acc.element_size(), bytes_broadcast, server_record, bool(stop[0] > 0),
                          float(loss_sum) / total_weight if total_weight > 0 else float("nan"))

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.rounds_done,
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "server_optimizer": self.strategy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.strategy.load_state_dict(state["server_optimizer"])
        self.rounds_done = int(state["round"])
