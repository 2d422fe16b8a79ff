"""Waits on other ranks name who holds them up: a rank that never arrived, and a rank that arrived and then
stopped (its heartbeat no longer moves). Real stores and threads, several "ranks" in one process."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as torch_dist

from mllmfl_dist.core.dist import Runtime
from mllmfl_dist.core.errors import RankLostError
from mllmfl_dist.core.waits import SILENT_SECONDS, Heartbeat, Waiting, WaitSettings

MINUTES = (SILENT_SECONDS + 1.5) / 60  # long enough for two heartbeat samples SILENT_SECONDS apart


def rank(store, r: int, world: int = 3) -> Runtime:
    return Runtime(
        r,
        world,
        r,
        "gloo",
        torch.device("cpu"),
        False,
        store=store,
        waits=WaitSettings(round_minutes=MINUTES, report_seconds=0.5),
    )


def wait_on_rank0(store, caplog) -> str:
    waiting = Waiting(rank(store, 0), "round 3's all_reduce", "dist.timeout_minutes", MINUTES)
    with caplog.at_level(logging.WARNING, logger="mllmfl_dist.core.waits"), pytest.raises(RankLostError) as err:
        with waiting:
            store.wait(["never/set"], timedelta(minutes=MINUTES))  # the collective that never completes
    return str(err.value)


def test_a_rank_that_arrived_and_then_stopped_is_named_as_gone_silent(caplog):
    store = torch_dist.HashStore()
    alive = Heartbeat(store, 1)
    try:
        store.set("wait/1/1", "1")
        store.set("wait/1/2", "1")  # rank 2 arrived, then was stopped: it never beats again
        message = wait_on_rank0(store, caplog)
    finally:
        alive.stop()
    assert message.startswith("rank 0: gave up on round 3's all_reduce after")
    assert message.endswith("(dist.timeout_minutes = 0.075); rank(s) 2 arrived but went silent (stopped or hung?)")
    reports = [r.getMessage() for r in caplog.records]
    assert reports and "every rank has arrived" in reports[0]  # before any heartbeat sample
    assert any("rank(s) 2 arrived but silent for 3 s or more" in line for line in reports), reports


def test_a_rank_that_never_arrived_is_named_once_whatever_its_heartbeat(caplog):
    store = torch_dist.HashStore()
    alive = Heartbeat(store, 2)
    try:
        store.set("wait/1/1", "1")  # rank 1 arrived and is silent; rank 2 beats but never arrives
        message = wait_on_rank0(store, caplog)
    finally:
        alive.stop()
    assert message.endswith("rank(s) 2 never arrived; rank(s) 1 arrived but went silent (stopped or hung?)")
    assert any("rank(s) 2 not there yet" in r.getMessage() for r in caplog.records)


def test_a_broken_wait_names_the_ranks_gone_and_not_the_timeout():
    store = torch_dist.HashStore()
    store.set("wait/1/1", "1")
    with pytest.raises(
        RankLostError,
        match=r"^rank 0: the broadcast broke after 0 s: rank\(s\) 2 dropped out "
        r"\(killed or crashed\?\): Connection reset by peer$",
    ):
        with Waiting(rank(store, 0), "the broadcast", "dist.timeout_minutes", MINUTES):
            raise torch_dist.DistError("Connection reset by peer")


def test_the_heartbeat_counts_until_stopped():
    store = torch_dist.HashStore()
    beat = Heartbeat(store, 4)
    time.sleep(2.5)
    beat.stop()
    counted = store.add("beat/4", 0)
    time.sleep(1.5)
    assert counted >= 2 and store.add("beat/4", 0) == counted
