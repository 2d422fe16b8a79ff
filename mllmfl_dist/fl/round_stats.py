"""What one federated round reports (:meth:`mllmfl_dist.fl.trainer.FederatedTrainer.run_round`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoundStats:
    round: int
    seconds: float
    clients: tuple[int, ...]  # the round's sampled clients
    local_clients: tuple[int, ...]  # those this rank trained
    bytes_all_reduced: int
    bytes_broadcast: int
    server: dict[str, float]  # the strategy's numbers of the round (rank 0), e.g. CReFF's match_loss
    # How many ranks were asked to stop (preempt.py); any: every rank stops after this round, and every rank
    # knows the count, so the line that reports the stop reads the same whichever rank prints it.
    stop_requests: int = 0
    train_loss: float = float("nan")  # the clients' mean training loss, weighted like the model (n_k; 1 under DP)
