"""Dispatch and restart decisions, synchronously."""

from __future__ import annotations

import random

import attrs

from trioherd._policy import Dispatcher, backoff_delay, request_limit, should_recycle


@attrs.define(eq=False)
class FakeWorker:
    name: str
    open_connections: int = 0


def test_round_robin_takes_turns_and_skips_full_workers() -> None:
    workers = [FakeWorker(n) for n in "abc"]
    dispatcher: Dispatcher[FakeWorker] = Dispatcher("round-robin", limit=2)
    for worker in workers:
        dispatcher.add(worker)
    assert [dispatcher.pick().name for _ in range(6)] == list("abcabc")  # type: ignore[union-attr]
    workers[1].open_connections = 2
    assert [dispatcher.pick().name for _ in range(4)] == list("acac")  # type: ignore[union-attr]
    for worker in workers:
        worker.open_connections = 2
    assert dispatcher.pick() is None
    assert not dispatcher.has_room()


def test_least_busy_prefers_the_emptiest_and_breaks_ties_by_turn() -> None:
    workers = [FakeWorker(n, load) for n, load in zip("abc", (5, 1, 1), strict=True)]
    dispatcher: Dispatcher[FakeWorker] = Dispatcher("least-busy", limit=10)
    for worker in workers:
        dispatcher.add(worker)
    first = dispatcher.pick()
    assert first is not None and first.name == "b"
    first.open_connections += 1
    second = dispatcher.pick()
    assert second is not None and second.name == "c"
    workers[0].open_connections = 10
    picks = set()
    for _ in range(4):
        chosen = dispatcher.pick()
        assert chosen is not None
        picks.add(chosen.name)
        chosen.open_connections += 1
    assert "a" not in picks


def test_removing_a_worker_keeps_the_turn_fair() -> None:
    workers = [FakeWorker(n) for n in "abcd"]
    dispatcher: Dispatcher[FakeWorker] = Dispatcher("round-robin", limit=5)
    for worker in workers:
        dispatcher.add(worker)
    assert dispatcher.pick() is workers[0]
    assert dispatcher.pick() is workers[1]
    dispatcher.remove(workers[0])
    assert dispatcher.pick() is workers[2]
    dispatcher.remove(workers[3])
    assert dispatcher.pick() is workers[1]
    dispatcher.remove(workers[1])
    dispatcher.remove(workers[2])
    assert dispatcher.pick() is None
    dispatcher.remove(workers[2])  # removing twice is harmless


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_delay(n, cap=1.0) for n in range(6)] == [0.0, 0.1, 0.2, 0.4, 0.8, 1.0]
    assert backoff_delay(10_000, cap=15.0) == 15.0


def test_request_limit_jitter_stays_in_range() -> None:
    rng = random.Random(7)
    limits = {request_limit(50, 10, rng) for _ in range(200)}
    assert min(limits) >= 50 and max(limits) <= 60 and len(limits) > 5
    assert request_limit(0, 10, rng) == 0
    assert request_limit(50, 0, rng) == 50


def test_should_recycle() -> None:
    assert should_recycle(49, 50, 0, 0) is None
    assert should_recycle(50, 50, 0, 0) == "max-requests"
    assert should_recycle(10, 0, 200 * 1024 * 1024, 100) == "max-memory"
    assert should_recycle(10, 0, 50 * 1024 * 1024, 100) is None
