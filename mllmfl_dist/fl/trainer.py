"""The round loop, written once for every strategy.

Each round: sample K of N clients from (seed, round); assign them to client hosts (LPT by size); every
host trains its clients one after another from the same global model and accumulates ``n_k * state_k``
into one float64 buffer with the total weight appended, followed by the strategy's named uploads (CReFF's
per-class classifier gradients); one all_reduce; the server steps the strategy and hands it the summed
uploads; one broadcast of the new global model as a flat buffer, followed by the strategy's named server state
(CReFF's re-trained classifier), after rank 0's ``server_hook`` (e.g. alignment). Named tensors are packed into
and out of the flat buffers by :class:`~mllmfl_dist.fl.aggregation.FlatLayout`, so no strategy slices offsets.

A strategy with per-client state (SCAFFOLD's c_i) has it kept by rank 0's store
(:class:`~mllmfl_dist.fl.client_state.ClientStateStore`): the broadcast ending a round also carries the entries
of the next round's sampled clients (the sample is known from (seed, round)), and each client's new entry comes
back in its own slot of the all_reduce (the other ranks add zeros there). Still one all_reduce and one broadcast.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch

from mllmfl_dist.config import ConfigError, FederatedConfig
from mllmfl_dist.core import dist
from mllmfl_dist.core.errors import TrainingDivergedError
from mllmfl_dist.core.seeds import TAG_CLIENT_TRAINING, TAG_CLIENT_UPLOAD, generator
from mllmfl_dist.data import ClientData
from mllmfl_dist.fl.aggregation import FlatLayout, accumulate_, add_named_, mean_from_sum
from mllmfl_dist.fl.client import LocalTraining, local_optimizer, local_steps, train_client
from mllmfl_dist.fl.client_state import ClientStateStore
from mllmfl_dist.fl.dp import CentralDP
from mllmfl_dist.fl.vectorized import VectorizedClients
from mllmfl_dist.fl.sampling import assign_clients, client_groups, sample_clients
from mllmfl_dist.fl.strategies import ClientContext, Strategy
from mllmfl_dist.fl.strategies.base import vectorize_refusal
from mllmfl_dist.fl.models import FLModel
from mllmfl_dist.fl.divergence import (
    DIVERGED_IN_GLOBAL_UPDATE,
    DIVERGED_IN_SERVER_HOOK,
    DIVERGED_IN_UPLOADS,
    DIVERGED_NOWHERE,
    DIVERGENCE_CODES,
    model_is_finite,
    round_divergence,
    tensors_are_finite,
)
from mllmfl_dist.fl.round_buffers import check_upload_size
from mllmfl_dist.fl.round_stats import RoundStats


class ServerHook(Protocol):
    """Rank 0's work on the new global model after the strategy's, before the broadcast (global alignment)."""

    def __call__(self, model: FLModel, round_index: int) -> None: ...

    def divergence_hints(self) -> list[str]:
        """``key = value`` settings to look at when the hook made the model non-finite."""


def _overrides(strategy: Strategy, hook: str) -> bool:
    return getattr(type(strategy), hook) is not getattr(Strategy, hook)


class FederatedTrainer:
    def __init__(
        self,
        federated: FederatedConfig,
        seed: int,
        local: LocalTraining,
        runtime: dist.Runtime,
        data: ClientData,
        model: FLModel,
        strategy: Strategy,
        server_hook: ServerHook | None = None,
        client_states: ClientStateStore | None = None,
        dp: CentralDP | None = None,
    ):
        self.federated, self.seed, self.local = federated, seed, local
        self.dp = dp  # central DP (fl/dp.py): clipped updates of weight 1, noise on rank 0
        self.runtime = runtime
        self.data = data
        self.model = model.to(runtime.device)
        self.strategy = strategy
        self.layout = FlatLayout.of_module(self.model)
        self.trainable_mask = self.layout.trainable_mask.to(runtime.device)
        self.upload_layout = FlatLayout.of_shapes(strategy.upload_shapes(self.model), torch.float64)
        if self.upload_layout.numel and not (
            _overrides(strategy, "client_upload") or _overrides(strategy, "finish_client")
        ):
            raise ConfigError(
                f"strategy {strategy.name!r} declares uploads ({', '.join(self.upload_layout.keys)}) "
                f"but computes them in neither client_upload nor finish_client"
            )
        # Per-client state: its layout, and rank 0's store (memory only when the caller gives none).
        self.client_state_layout = FlatLayout.of_shapes(strategy.client_state_shapes(self.model), torch.float32)
        width, k = self.client_state_layout.numel, federated.clients_per_round
        check_upload_size(strategy.name, self.upload_layout, width, k)
        self.client_states = None
        if width and runtime.is_server:
            self.client_states = client_states if client_states is not None else ClientStateStore(None, 0)
        self._incoming: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (round, states [K, S], present [K])
        # A slot's flag says that its client returned state (a client whose strategy returned none gets no entry).
        extra_round = {"client_states": (k, width), "client_state_present": (k,)} if width else {}
        extra_broadcast = {"client_states": (k, width), "client_state_present": (k,)} if width else {}
        state = strategy.broadcast_state(self.model)
        self.state_layout = FlatLayout.of_shapes({k: tuple(v.shape) for k, v in state.items()}, torch.float32)
        # The round's two buffers, laid out once (described where they are filled, in run_round and _broadcast).
        self.round_layout = FlatLayout.of_shapes(
            {
                "model": (self.layout.numel + 1,),
                "uploads": (self.upload_layout.numel,),
                "diverged": (federated.clients_per_round,),
                "stop": (1,),
                "loss": (1,),
                **extra_round,
            }
        )
        self.broadcast_layout = FlatLayout.of_shapes(
            {"model": (self.layout.numel,), "state": (self.state_layout.numel,), "status": (1,), **extra_broadcast},
            torch.float32,
        )
        # Vectorized clients (federated.vectorize > 1); the config loader refuses strategies that cannot, and so
        # does this, for a trainer built without it.
        self.vectorized = None
        if federated.vectorize > 1:
            refusal = vectorize_refusal(type(strategy))
            if refusal:
                raise ConfigError(f"federated.vectorize = {federated.vectorize} with {strategy.name!r}: {refusal}")
            self.vectorized = VectorizedClients(self.model, local, strategy.local_penalty)
        # Rank 0 only, after the server step and before the broadcast (global alignment plugs in here).
        self.server_hook = server_hook
        self.server_hook_hints: list[str] = []  # what to look at when the hook diverged, on the ranks without it
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
        """Make every rank hold rank 0's global model (and the strategy's server state, after it in the same
        buffer); returns the bytes broadcast."""
        sent, status = self._broadcast(
            DIVERGED_NOWHERE, "rank 0's broadcast of the model to start from", self.rounds_done + 1
        )
        if status != DIVERGED_NOWHERE:
            raise TrainingDivergedError(
                f"the global model to start round {self.rounds_done + 1} from is non-finite (a checkpoint or "
                f"backbone written by a run that diverged?); start over with another run.name"
            )
        return sent

    def _broadcast(self, status: str, what: str, next_round: int) -> tuple[int, str]:
        """The broadcast, carrying rank 0's divergence ``status`` (and the stored state of the clients of
        ``next_round``); returns the bytes broadcast and the status every rank received (a non-finite buffer
        counts as diverged too)."""
        layout = self.broadcast_layout
        flat = torch.empty(layout.numel, dtype=torch.float32, device=self.runtime.device)
        parts = layout.views(flat)
        self.layout.flatten(self.model.state_dict(), out=parts["model"])
        if self.state_layout.numel:
            self.state_layout.flatten(self.strategy.broadcast_state(self.model), out=parts["state"])
        if self.client_states is not None:  # the stored entries of next_round's clients (none past the last round)
            fed = self.federated
            sampled = sample_clients(self.seed, next_round, fed.num_clients, fed.clients_per_round)
            self.client_states.fill_slots(
                parts["client_states"], parts["client_state_present"], sampled if next_round <= fed.rounds else []
            )
        parts["status"][0] = DIVERGENCE_CODES.index(status)
        dist.broadcast_from_server_(self.runtime, flat, what)
        status = DIVERGENCE_CODES[int(parts["status"][0])]
        if status == DIVERGED_NOWHERE and not bool(torch.isfinite(flat).all()):
            status = DIVERGED_IN_GLOBAL_UPDATE
        if status == DIVERGED_NOWHERE:
            self.set_global_flat(parts["model"])
            if self.state_layout.numel:
                self.strategy.receive_state(self.state_layout.views(parts["state"]))
            if self.client_state_layout.numel:
                self._incoming = (next_round, parts["client_states"].clone(), parts["client_state_present"].clone())
        return flat.numel() * flat.element_size(), status

    def _client_context(self, round_index: int, slot: int, cid: int, num_samples: int) -> ClientContext:
        state = None
        if self.client_state_layout.numel:
            if self._incoming is None or self._incoming[0] != round_index:
                raise RuntimeError(f"round {round_index} started without its clients' state from the broadcast")
            _, states, present = self._incoming
            if present[slot] > 0:
                state = self.client_state_layout.views(states[slot])
        return ClientContext(cid, round_index, num_samples, local_steps(num_samples, self.local), state)

    # -- a host's clients -------------------------------------------------------------------------
    def _train_one_by_one(
        self,
        mine: Sequence[int],
        clients: Sequence[int],
        round_index: int,
        start: torch.Tensor,
        upload_parts: dict[str, torch.Tensor],
    ) -> Iterator[tuple[int, ClientContext, torch.Tensor, float]]:
        """Train this host's clients one after another from ``start``; yields (slot, context, trained flat
        state, loss) while the model still holds the client's model (finish_client may read it)."""
        seed, device = self.seed, self.runtime.device
        global_params: list[torch.Tensor] = []
        if mine and self.strategy.reads_global_params:
            global_params = [p.detach().clone() for p in self.model.parameters() if p.requires_grad]
        # Per client, only what training needs: the model is reset from a copy of the round's start in its own
        # dtypes and read back in one foreach copy each (no state_dict rebuilt per client), and the SGD optimizer
        # is built once per round and reset (its momentum cleared), which is what a new one would hold.
        # The model holds ``start`` already: run_round read it from the model.
        state = self.model.state_dict()
        tensors = [state[key] for key in self.layout.keys]
        start_tensors = [t.detach().clone() for t in tensors]
        optimizer = local_optimizer(self.model, self.local)
        for cid in mine:
            torch._foreach_copy_(tensors, start_tensors)
            images, labels = self.data.client(cid)
            slot = clients.index(cid)
            client = self._client_context(round_index, slot, cid, labels.shape[0])
            if self.upload_layout.numel:
                upload_generator = generator(seed, TAG_CLIENT_UPLOAD, round_index, cid)
                add_named_(
                    upload_parts,
                    self.strategy.client_upload(self.model, images, labels, self.local, upload_generator, device),
                )
            self.strategy.start_client(self.model, client)
            loss = train_client(
                self.model,
                images,
                labels,
                self.local,
                generator(seed, TAG_CLIENT_TRAINING, round_index, cid),
                self.strategy,
                global_params,
                device,
                self.strategy.local_loss_inputs(self.data, cid),
                optimizer,
            )
            trained = torch.empty(self.layout.numel, dtype=torch.float64, device=device)
            torch._foreach_copy_(list(self.layout.views(trained).values()), tensors)
            yield slot, client, trained, loss

    def _train_stacked(
        self, groups: Sequence[Sequence[int]], clients: Sequence[int], round_index: int, start: torch.Tensor
    ) -> Iterator[tuple[int, ClientContext, torch.Tensor, float]]:
        """Train this host's groups of clients each as one stacked model (fl/vectorized.py), from ``start``;
        yields what :meth:`_train_one_by_one` does (strategies that vectorize read no model in finish_client)."""
        assert self.vectorized is not None  # the caller's choice; the model holds ``start`` (read from it)
        trained = self.vectorized.train_groups(groups, self.data, self.seed, round_index, self.model.state_dict())
        for cid, num_samples, state, loss in trained:
            slot = clients.index(cid)
            yield slot, self._client_context(round_index, slot, cid, num_samples), self.layout.flatten(state), loss

    # -- one round -------------------------------------------------------------------------------
    def run_round(self, round_index: int) -> RoundStats:
        started = self._last_round_end or time.perf_counter()
        fed, seed = self.federated, self.seed
        clients = sample_clients(seed, round_index, fed.num_clients, fed.clients_per_round)
        sizes = [self.data.client_size(c) for c in clients]
        if self.vectorized is None:
            mine = assign_clients(clients, sizes, self.runtime.client_hosts).get(self.runtime.rank, [])
            groups: list[tuple[int, ...]] = [(cid,) for cid in mine]
        else:  # groups of the round's clients, whatever the hosts; each group trained whole on one host
            all_groups = client_groups(clients, sizes, fed.vectorize)
            size_of = dict(zip(clients, sizes))
            group_sizes = [sum(size_of[c] for c in g) for g in all_groups]
            plan = assign_clients(range(len(all_groups)), group_sizes, self.runtime.client_hosts)
            groups = [all_groups[i] for i in plan.get(self.runtime.rank, [])]
            mine = sorted(c for g in groups for c in g)

        start = self.global_flat(torch.float64)
        # One buffer for the one all_reduce: the model's weighted sum and total weight, then the strategy's
        # uploads, then one flag per sampled client that went non-finite (so every rank learns which, and stops),
        # then the count of ranks asked to stop (preempt.py), so every rank stops after the same round, then the
        # clients' training losses weighted like the model (sum n_k * loss_k; / total weight = the mean).
        layout = self.round_layout
        acc = torch.zeros(layout.numel, dtype=torch.float64, device=self.runtime.device)
        parts = layout.views(acc)
        model_acc, uploads, diverged = parts["model"], parts["uploads"], parts["diverged"]
        parts["stop"][0] = 1.0 if self.runtime.stop is not None and self.runtime.stop.reason else 0.0
        upload_parts = self.upload_layout.views(uploads)
        trained = (
            self._train_one_by_one(mine, clients, round_index, start, upload_parts)
            if self.vectorized is None
            else self._train_stacked(groups, clients, round_index, start)
        )
        for slot, client, state, loss in trained:  # one client at a time, its trained state flat (float64)
            finite = bool(torch.isfinite(state).all())
            if finite:
                update = self.strategy.finish_client(self.model, client, start, state, self.trainable_mask)
                finite = tensors_are_finite(update.uploads) and (
                    update.state is None or tensors_are_finite(update.state)
                )
            if finite:
                weight = client.num_samples
                if self.dp is not None:  # clipped, weight 1: the sensitivity bound of fl/dp.py
                    state, weight = self.dp.clip(start, state), 1
                accumulate_(model_acc, state, weight)
                if math.isfinite(loss):  # a one-sample client takes no step and has no loss
                    parts["loss"] += weight * loss
                add_named_(upload_parts, update.uploads)
                if self.client_state_layout.numel:
                    new_state = update.state if update.state is not None else client.state
                    if new_state is not None:
                        self.client_state_layout.flatten(new_state, out=parts["client_states"][slot])
                        parts["client_state_present"][slot] = 1.0
            else:  # kept out of the sum; every rank stops after the all_reduce
                diverged[slot] = 1

        dist.all_reduce_sum_(self.runtime, acc, f"round {round_index}'s all_reduce")
        failed = [c for c, flag in zip(clients, diverged.tolist()) if flag]
        if failed:
            raise TrainingDivergedError(self._divergence(round_index, "clients", failed))
        server_record: dict[str, float] = {}
        status = DIVERGED_NOWHERE
        if self.runtime.is_server:
            if self.client_states is not None:  # each client's slot: its new state, zeros from every other rank
                for slot, cid in enumerate(clients):
                    if parts["client_state_present"][slot] > 0:
                        self.client_states.put(cid, round_index, parts["client_states"][slot])
            mean = mean_from_sum(model_acc) if self.dp is None else self.dp.noisy_mean(model_acc, round_index)
            new = self.strategy.server_update(start, mean, self.trainable_mask, self.upload_layout.views(uploads))
            self.set_global_flat(new)
            status = DIVERGED_NOWHERE if model_is_finite(self.model) else DIVERGED_IN_GLOBAL_UPDATE
            if status == DIVERGED_NOWHERE:
                server_record = self.strategy.process_uploads(
                    self.model, self.upload_layout.views(uploads), round_index
                )
                if self.state_layout.numel and not tensors_are_finite(self.strategy.broadcast_state(self.model)):
                    status = DIVERGED_IN_UPLOADS
            if self.server_hook is not None and status == DIVERGED_NOWHERE:
                self.server_hook(self.model, round_index)
                status = DIVERGED_NOWHERE if model_is_finite(self.model) else DIVERGED_IN_SERVER_HOOK
        bytes_broadcast, status = self._broadcast(
            status, f"rank 0's broadcast of round {round_index}'s model", round_index + 1
        )
        if status != DIVERGED_NOWHERE:
            raise TrainingDivergedError(self._divergence(round_index, status))
        self.rounds_done = round_index
        self._last_round_end = time.perf_counter()
        total_weight = float(model_acc[-1])
        return RoundStats(
            round_index,
            self._last_round_end - started,
            tuple(clients),
            tuple(mine),
            acc.numel() * acc.element_size(),
            bytes_broadcast,
            server_record,
            round(float(parts["stop"][0])),
            float(parts["loss"]) / total_weight if total_weight > 0 else float("nan"),
        )

    def _divergence(self, round_index: int, where: str, clients: Sequence[int] = ()) -> str:
        hook_hints = self.server_hook.divergence_hints() if self.server_hook is not None else self.server_hook_hints
        return round_divergence(round_index, where, self.federated, self.strategy, hook_hints, clients)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Rank 0: what a checkpoint keeps. With per-client state this commits the store (its entries held
        only in memory are written to disk; the index returned names them): call :meth:`checkpoint_saved` once
        the checkpoint is on disk."""
        state = {
            "round": self.rounds_done,
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "strategy": self.strategy.state_dict(),
        }
        if self.client_states is not None:
            state["client_state"] = self.client_states.commit()
        return state

    def checkpoint_saved(self) -> None:
        """Rank 0, after the checkpoint of :meth:`state_dict` was written: store files only older checkpoints
        read go."""
        if self.client_states is not None:
            self.client_states.saved()

    def forget_client_states(self) -> None:
        """Rank 0, starting a run afresh: no client has state (files a run killed before its first checkpoint
        left are removed)."""
        if self.client_states is not None:
            self.client_states.restore(None)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint's state; one written before the strategy's state was called "strategy" holds it as
        "server_optimizer"."""
        self.model.load_state_dict(state["model"])
        self.strategy.load_state_dict(state["strategy"] if "strategy" in state else state["server_optimizer"])
        if self.client_states is not None:
            self.client_states.restore(state.get("client_state"))
        self.rounds_done = int(state["round"])
