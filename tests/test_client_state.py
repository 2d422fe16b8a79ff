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
