"""The hand-off's back-pressure rules, synchronously: batches in flight to one worker, and
when a worker counts as paused or stalled (trioherd/_transit.py)."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from trioherd._policy import Dispatcher
from trioherd.primary.process import WorkerState
from trioherd.primary.transit import ACK_DEADLINE, PAUSE_AFTER, WINDOW, Skip, Transit


def test_batches_are_numbered_and_acknowledged_in_order() -> None:
    transit = Transit()
    assert [transit.sent(0, [fd], now=0.0) for fd in (10, 11, 12)] == [1, 2, 3]
    done = transit.acknowledge(2, now=0.001)
    assert [batch.fds for batch in done] == [[10], [11]]
    assert [batch.seq for batch in transit.batches] == [3]
    assert transit.acknowledge(2, now=0.002) == []  # nothing new: no progress


def test_a_worker_with_nothing_in_flight_is_never_behind() -> None:
    transit = Transit()
    assert transit.verdict(now=1000.0) is None
    transit.sent(0, [10], now=5.0)
    transit.acknowledge(1, now=5.001)
    assert transit.verdict(now=1000.0) is None


def test_a_batch_left_waiting_pauses_then_stalls_its_worker() -> None:
    transit = Transit()
    transit.sent(0, [10], now=10.0)
    assert transit.verdict(now=10.0 + PAUSE_AFTER / 2) is None
    assert transit.verdict(now=10.0 + PAUSE_AFTER * 1.5) is Skip.PAUSED
    assert transit.verdict(now=10.0 + ACK_DEADLINE * 1.01) is Skip.STALLED


def test_a_worker_working_through_a_deep_queue_is_never_stalled() -> None:
    """Progress, not the age of the oldest batch, is what counts: a worker that takes one
    batch every 10 ms while 100 wait is never judged behind."""
    transit = Transit()
    for seq in range(100):
        transit.sent(0, [seq], now=0.0)
    for step in range(1, 101):
        now = step * 0.01
        assert transit.verdict(now) is None, step
        transit.acknowledge(step, now)
        transit.sent(0, [1000 + step], now)  # and more keep coming
    assert len(transit.batches) == 100
    assert now - transit.batches[0].sent_at > ACK_DEADLINE  # old, yet not stalled
    assert transit.verdict(now + PAUSE_AFTER / 2) is None


def test_the_wait_starts_with_the_first_batch_after_a_quiet_spell() -> None:
    transit = Transit()
    transit.sent(0, [10], now=0.0)
    transit.acknowledge(1, now=0.001)
    transit.sent(0, [11], now=50.0)  # long after: the worker was idle, not behind
    assert transit.verdict(now=50.0 + PAUSE_AFTER / 2) is None


def test_recalled_batches_come_out_and_the_rest_stay_in_order() -> None:
    transit = Transit()
    for fd in (10, 11, 12, 13):
        transit.sent(1, [fd], now=0.0)
    back = transit.take_back({2, 4})
    assert [(b.seq, b.listener, b.fds) for b in back] == [(2, 1, [11]), (4, 1, [13])]
    assert [b.seq for b in transit.batches] == [1, 3]
    assert transit.take_back(set()) == []
    assert [b.seq for b in transit.take_all()] == [1, 3]
    assert not transit.batches


@attrs.define(eq=False)
class Worker:
    name: str
    open_connections: int = 0
    unacknowledged: int = 0


def test_a_full_window_is_skipped_without_being_taken_out_of_dispatch() -> None:
    """A burst: the dispatcher fills each window, then has no room (the primary stops
    accepting); an acknowledgement gives room back to that worker at once."""
    workers = [Worker(name) for name in "ab"]
    dispatcher: Dispatcher[Worker] = Dispatcher("round-robin", limit=10_000, window=WINDOW)
    for worker in workers:
        dispatcher.add(worker)
    picks = 0
    while (worker := dispatcher.pick()) is not None:
        worker.unacknowledged += 1
        picks += 1
        assert picks <= 2 * WINDOW
    assert picks == 2 * WINDOW
    assert not dispatcher.has_room()
    assert workers[0] in dispatcher and workers[1] in dispatcher
    workers[1].unacknowledged -= 16  # it took a packet
    assert dispatcher.has_room()
    for _ in range(16):
        worker = dispatcher.pick()
        assert worker is workers[1]
        worker.unacknowledged += 1
    assert dispatcher.pick() is None


def test_least_busy_passes_over_a_full_window_too() -> None:
    idle, busy = Worker("idle", 0, WINDOW), Worker("busy", 50, 0)
    dispatcher: Dispatcher[Worker] = Dispatcher("least-busy", limit=100, window=WINDOW)
    dispatcher.add(idle)
    dispatcher.add(busy)
    assert dispatcher.pick() is busy


@attrs.define(eq=False)
class Slot:
    active: bool = True


@attrs.define(eq=False)
class ReadyWorker:
    """What the hand-off reads of a worker to admit, pause and readmit it."""

    id: int = 1
    pid: int = 1234
    state: WorkerState = WorkerState.READY
    slot: Slot = attrs.Factory(Slot)
    open_connections: int = 0
    unacknowledged: int = 0


@pytest.mark.trio
@pytest.mark.parametrize("withdrawn", [False, True])
async def test_a_pause_ends_at_the_next_acknowledgement_unless_the_worker_was_withdrawn(
    withdrawn: bool,
) -> None:
    """A paused worker is readmitted when it is heard from; one withdrawn meanwhile (at its
    request or memory limit, its channel broken) stays out until admitted again."""
    from trioherd._config import Config
    from trioherd.primary.handoff import Handoff

    handoff = Handoff([], Config())
    worker: Any = ReadyWorker()
    handoff.admit(worker)
    assert handoff.is_dispatching_to(worker)
    handoff._skip(worker, handoff._transit[worker], Skip.PAUSED, "is slow to acknowledge")
    assert not handoff.is_dispatching_to(worker)
    if withdrawn:
        handoff.withdraw(worker)
    handoff.heard_from(worker)
    assert handoff.is_dispatching_to(worker) is not withdrawn
