"""The per-client state store (mllmfl_dist/fl/client_state.py): memory budget and spill to disk, versions by round,
a restore reading every client as of its checkpoint, temporary files of killed writes, disk bounded by clients."""

from __future__ import annotations

import torch

from mllmfl_dist.core.checkpoint import TEMP_SUFFIX
from mllmfl_dist.fl.client_state import ClientStateStore

WIDTH = 8  # float32 entries: 32 bytes each


def entry(client: int, round_index: int) -> torch.Tensor:
    return torch.full((WIDTH,), client + round_index / 100, dtype=torch.float64)


def files(directory) -> set[str]:
    return {p.name for p in directory.iterdir()} if directory.is_dir() else set()


def test_entries_beyond_the_memory_budget_spill_to_disk_and_read_back(tmp_path):
    store = ClientStateStore(tmp_path / "cs", memory_bytes=2 * WIDTH * 4)  # two entries
    for client in range(5):
        store.put(client, 1, entry(client, 1))
    assert store.memory_used <= 2 * WIDTH * 4
    assert files(tmp_path / "cs") == {"0-1.pt", "1-1.pt", "2-1.pt"}  # the three least recently used
    for client in range(5):
        assert torch.equal(store.get(client), entry(client, 1).float())
    assert store.get(7) is None and 7 not in store and len(store) == 5
    assert store.memory_used <= 2 * WIDTH * 4


def test_a_restore_reads_every_client_as_of_its_checkpoint_and_drops_newer_files(tmp_path):
    directory = tmp_path / "cs"
    store = ClientStateStore(directory, memory_bytes=1 << 20)
    for round_index, clients in ((1, (0, 1)), (2, (1, 2))):
        for client in clients:
            store.put(client, round_index, entry(client, round_index))
    index = store.commit()  # the checkpoint of round 2
    store.saved()
    assert files(directory) == {"0-1.pt", "1-2.pt", "2-2.pt"}  # client 1's round-1 entry never reached disk
    # Rounds 3 and 4 run without a checkpoint; entries spill to disk (budget 0), then the job is killed.
    store.memory_bytes = 0
    for round_index, clients in ((3, (0, 2, 3)), (4, (0, 3))):
        for client in clients:
            store.put(client, round_index, entry(client, round_index))
    assert {"0-4.pt", "2-3.pt", "3-4.pt"} <= files(directory)
    assert "0-1.pt" in files(directory) and "2-2.pt" in files(directory)  # the checkpoint still needs them

    resumed = ClientStateStore(directory, memory_bytes=1 << 20)
    resumed.restore(index)
    assert files(directory) == {"0-1.pt", "1-2.pt", "2-2.pt"}
    assert torch.equal(resumed.get(0), entry(0, 1).float())
    assert torch.equal(resumed.get(2), entry(2, 2).float())
    assert resumed.get(3) is None and resumed.version(1) == 2


def test_superseded_versions_go_once_the_next_checkpoint_is_saved_so_disk_grows_with_clients_only(tmp_path):
    directory = tmp_path / "cs"
    store = ClientStateStore(directory, memory_bytes=0)
    for round_index in range(1, 21):
        for client in (round_index % 3, (round_index + 1) % 3):
            store.put(client, round_index, entry(client, round_index))
        assert len(files(directory)) <= 2 * 3  # at most the committed and the newest version per client
        if round_index % 4 == 0:
            index = store.commit()
            assert len(files(directory)) <= 2 * 3
            store.saved()
            assert len(files(directory)) == 3
    assert dict(zip(index["clients"].tolist(), index["rounds"].tolist())) == {0: 20, 1: 19, 2: 20}
    assert store.disk_bytes() == sum(p.stat().st_size for p in directory.iterdir())


def test_a_restore_removes_temporary_files_of_a_killed_write_and_a_fresh_start_forgets_everything(tmp_path):
    directory = tmp_path / "cs"
    store = ClientStateStore(directory, memory_bytes=0)
    store.put(4, 1, entry(4, 1))
    index = store.commit()
    torn = directory / f".4-2.pt.abc123{TEMP_SUFFIX}"  # what atomic_writer leaves when killed mid-write
    torn.write_bytes(b"torn")
    resumed = ClientStateStore(directory, memory_bytes=0)
    resumed.restore(index)
    assert files(directory) == {"4-1.pt"}
    assert torch.equal(resumed.get(4), entry(4, 1).float())
    resumed.restore(None)
    assert files(directory) == set() and len(resumed) == 0


def test_a_memory_only_store_keeps_everything_in_memory():
    store = ClientStateStore(None, memory_bytes=0)
    for client in range(3):
        store.put(client, 1, entry(client, 1))
    assert store.memory_used == 3 * WIDTH * 4 and store.disk_bytes() == 0
    assert torch.equal(store.get(2), entry(2, 1).float())


def smoke_trainer(*sets: str):
    """A single-process FederatedTrainer on configs/smoke.toml (one local epoch) with these overrides."""
    from pathlib import Path

    from mllmfl_dist.config import load_config
    from mllmfl_dist.core import dist
    from mllmfl_dist.fl.client import LocalTraining
    from mllmfl_dist.fl.strategies import build_strategy
    from mllmfl_dist.fl.trainer import FederatedTrainer
    from mllmfl_dist.stages.inputs import build_data, build_fl_model

    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
    cfg = load_config(smoke, ["federated.local_epochs=1", *sets], check_run_dir=False)
    runtime = dist.Runtime(0, 1, 0, "none", torch.device("cpu"), False)
    data = build_data(cfg, runtime)
    strategy = build_strategy(cfg)
    model = build_fl_model(cfg.model, data, cfg.run.seed, strategy.projection_dim)
    local = LocalTraining.of(cfg.federated, cfg.data, data.mean, data.std)
    return FederatedTrainer(cfg.federated, cfg.run.seed, local, runtime, data, model, strategy)


def test_a_client_whose_strategy_returns_no_state_gets_no_entry_in_the_store():
    """Only clients that hold state have entries: before, a client returning None was stored as zeros."""
    from mllmfl_dist.config.plugins import register_strategy, unregister_strategy
    from mllmfl_dist.fl.sampling import sample_clients
    from mllmfl_dist.fl.strategies import ClientUpdate, FedAvg

    class EvenClientsKeepState(FedAvg):
        name = "even_clients_keep_state"

        def client_state_shapes(self, model):
            return {"s": (3,)}

        def finish_client(self, model, client, start, trained, trainable_mask):
            keep = client.client_id % 2 == 0
            return ClientUpdate({}, {"s": torch.full((3,), client.client_id + 1.0)} if keep else None)

    register_strategy(EvenClientsKeepState)
    try:
        trainer = smoke_trainer("federated.strategy=even_clients_keep_state")
        trainer.broadcast_global()
        for round_index in (1, 2):
            trainer.run_round(round_index)
    finally:
        unregister_strategy("even_clients_keep_state")
    sampled = set(sample_clients(0, 1, 20, 6)) | set(sample_clients(0, 2, 20, 6))
    store = trainer.client_states
    assert {c for c in range(20) if c in store} == {c for c in sampled if c % 2 == 0}
    assert any(c % 2 for c in sampled)  # the round did sample clients that keep none
    for c in sampled:
        if c % 2 == 0:
            assert torch.equal(store.get(c), torch.full((3,), c + 1.0))
