"""Dispatch and restart decisions, synchronously."""

from __future__ import annotations

import random

import attrs

from trioherd._config import Config
from trioherd._policy import (
    Dispatcher,
    ExitDecision,
    ExitFacts,
    after_exit,
    backoff_delay,
    free_indexes,
    request_limit,
    should_recycle,
)


@attrs.define(eq=False)
class FakeWorker:
    name: str
    open_connections: int = 0
    unacknowledged: int = 0


def test_round_robin_takes_turns_and_skips_full_workers() -> None:
    workers = [FakeWorker(n) for n in "abc"]
    dispatcher: Dispatcher[FakeWorker] = Dispatcher("round-robin", limit=2, window=4)
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
    dispatcher: Dispatcher[FakeWorker] = Dispatcher("least-busy", limit=10, window=4)
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
    dispatcher: Dispatcher[FakeWorker] = Dispatcher("round-robin", limit=5, window=4)
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
    # the successor starts at three quarters of the limit, ready before the limit
    assert should_recycle(37, 50, 0, 0) is None
    assert should_recycle(38, 50, 0, 0) == "max-requests"
    assert should_recycle(1, 1, 0, 0) == "max-requests"
    assert should_recycle(10, 0, 200 * 1024 * 1024, 100) == "max-memory"
    assert should_recycle(10, 0, 50 * 1024 * 1024, 100) is None


def _facts(**changes: object) -> ExitFacts:
    facts = ExitFacts(
        successor_wanted=True,
        drained_itself=False,
        was_ready=True,
        uptime=1.0,
        killed_for=None,
        boot_failures=0,
        slot_failures=0,
    )
    return attrs.evolve(facts, **changes)


def _decide(facts: ExitFacts) -> ExitDecision:
    config = Config(min_uptime=10.0, backoff_max=15.0, max_boot_failures=3)
    return after_exit(facts, config)


def test_an_exit_nobody_needs_a_successor_for_changes_nothing() -> None:
    decision = _decide(_facts(successor_wanted=False, boot_failures=2, was_ready=False))
    assert decision.action == "none"
    assert decision.boot_failures == 2


def test_a_worker_sigtermed_from_outside_is_replaced_at_once_without_penalty() -> None:
    decision = _decide(_facts(drained_itself=True, slot_failures=3))
    assert (decision.action, decision.delay, decision.cause) == ("respawn", 0.0, "signal")
    assert not decision.penalised
    assert decision.slot_failures == 3


def test_boot_deaths_back_off_doubling_up_to_backoff_max() -> None:
    delays = []
    failures = 0
    for _ in range(6):
        decision = _decide(_facts(slot_failures=failures, was_ready=False))
        assert decision.action == "respawn" and decision.cause == "boot" and decision.penalised
        delays.append(decision.delay)
        failures = decision.slot_failures
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2]


def test_deaths_of_serving_workers_back_off_at_most_a_second() -> None:
    delays = []
    failures = 0
    for _ in range(6):
        decision = _decide(_facts(slot_failures=failures))
        assert decision.action == "respawn" and decision.cause == "crash" and decision.penalised
        delays.append(decision.delay)
        failures = decision.slot_failures
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    # a long life resets the back-off
    assert _decide(_facts(slot_failures=failures, uptime=10.0)).delay == 0.1


def test_the_last_serving_worker_dying_is_replaced_at_once() -> None:
    decision = _decide(_facts(slot_failures=8, others_ready=0))
    assert (decision.action, decision.delay) == ("respawn", 0.0)
    # but an app that cannot boot still backs off, herd empty or not
    assert _decide(_facts(slot_failures=3, others_ready=0, was_ready=False)).delay == 0.8


def test_the_cause_is_the_reason_trioherd_killed_it() -> None:
    assert _decide(_facts(killed_for="timeout")).cause == "timeout"
    assert _decide(_facts(was_ready=False)).cause == "boot"


def test_boot_failures_in_a_row_give_up_at_the_limit() -> None:
    first = _decide(_facts(was_ready=False))
    assert (first.action, first.boot_failures) == ("respawn", 1)
    second = _decide(_facts(was_ready=False, boot_failures=first.boot_failures))
    assert (second.action, second.boot_failures) == ("respawn", 2)
    third = _decide(_facts(was_ready=False, boot_failures=second.boot_failures))
    assert third.action == "give-up"
    # a ready worker's death does not count towards giving up
    assert _decide(_facts(boot_failures=2)).boot_failures == 2


def test_new_slots_take_the_lowest_free_indexes() -> None:
    assert free_indexes([], 3) == [0, 1, 2]
    assert free_indexes([0, 2, 5], 3) == [1, 3, 4]
    assert free_indexes([1], 1) == [0]
